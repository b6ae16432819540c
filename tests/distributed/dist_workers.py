"""What each process of a multi-process test runs; every function returns plain tensors for rank 0 to check."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from dist_harness import HYPER, make_model, train
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from adoptim import ADOPT


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model: torch.nn.Module, opt: ADOPT) -> dict[str, Any]:
    """Whole (unsharded) parameters and optimizer state, in parameter order."""
    params = list(model.parameters())
    return {
        "params": [_full(p) for p in params],
        "state": [
            {k: _full(v) for k, v in opt.state[p].items()} if p in opt.state else {} for p in params
        ],
        "dtensor": [isinstance(p, DTensor) for p in params],
        "dtensor_state": [isinstance(opt.state[p].get("exp_avg"), DTensor) for p in params if p in opt.state],
    }


def ddp(rank: int, world_size: int, kernel: dict[str, Any], steps: int) -> dict[str, Any]:
    model = DistributedDataParallel(make_model())
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    train(model, opt, range(steps), rank, world_size)
    return snapshot(model.module, opt)


def shard_fsdp2(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """``model`` (linear, activation, linear) with each linear layer, and then the whole, sharded by FSDP2."""
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_model(world_size: int) -> torch.nn.Module:
    """The problem's model sharded by FSDP2."""
    return shard_fsdp2(make_model(), world_size)


def fsdp2(rank: int, world_size: int, kernel: dict[str, Any], steps: int) -> dict[str, Any]:
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    train(model, opt, range(steps), rank, world_size)
    out = snapshot(model, opt)
    out["local_numel"] = [p.to_local().numel() for p in model.parameters()]
    return out


def zero(rank: int, world_size: int, kernel: dict[str, Any], steps: int) -> dict[str, Any]:
    model = DistributedDataParallel(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ADOPT, **HYPER, **kernel)
    train(model, opt, range(steps), rank, world_size)
    # Each process steps only its partition: count the parameters it holds state for.
    owned = len(opt.optim.state)
    opt.consolidate_state_dict(to=0)
    return {
        "params": [p.detach().clone() for p in model.module.parameters()],
        "owned": owned,
        "state_dict": opt.state_dict() if rank == 0 else None,
    }


def _save(path: str, model: torch.nn.Module, opt: ADOPT) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load(path: str, model: torch.nn.Module, opt: ADOPT) -> None:
    """Load a checkpoint written by :func:`_save` into ``model`` and ``opt``, resharding as needed."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def fsdp2_save_and_continue(
    rank: int, world_size: int, kernel: dict[str, Any], path: str, first: int, total: int, late: int = 0
) -> dict[str, Any]:
    """Train ``first`` steps, save a sharded checkpoint, then train on to ``total`` without stopping.

    ``late``: the last layer's bias gets its first gradient at that step (``stateless_at_save`` says
    whether it had no state when saved).
    """
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    train(model, opt, range(first), rank, world_size, late)
    stateless = model[2].bias not in opt.state
    _save(path, model, opt)
    train(model, opt, range(first, total), rank, world_size, late)
    return {**snapshot(model, opt), "stateless_at_save": stateless}


def fsdp2_resume(
    rank: int, world_size: int, kernel: dict[str, Any], path: str, first: int, total: int, late: int = 0,
    recipe: bool = False,
) -> dict[str, Any]:
    """A fresh process group: build the sharded model, load the checkpoint, train the remaining steps.

    ``late`` as in ``fsdp2_save_and_continue``; a loading error of such a run is returned to the test
    (``error``), which checks it. ``recipe``: load with the README's recipe for parameters that had no
    state when saved.
    """
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    try:
        (load_keeping_unsaved_params_stateless if recipe else load)(path, model, opt)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        if not late:
            raise
        return {"error": f"{type(exc).__name__}: {exc}"}
    stateless = model[2].bias not in opt.state
    train(model, opt, range(first, total), rank, world_size, late)
    return {**snapshot(model, opt), "stateless_after_load": stateless, "error": None}


def tensor_parallel_grads(t: int) -> list[torch.Tensor]:
    """The whole gradients of step ``t`` for the two parameters of ``tensor_parallel`` (4 x 5 each)."""
    g = torch.Generator().manual_seed(2000 + t)
    return [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]


def tensor_parallel_start() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]


def tensor_parallel(rank: int, world_size: int, kernel: dict[str, Any], steps: int) -> dict[str, Any]:
    """Gradients laid out otherwise than their parameters, as tensor parallelism makes them.

    A ``Replicate`` parameter whose gradient is ``Partial`` (each process holds a share of the sum) and a
    ``Shard(0)`` parameter whose gradient is ``Shard(1)``.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    start = tensor_parallel_start()
    params = [torch.nn.Parameter(distribute_tensor(start[0].clone(), mesh, [Replicate()])),
              torch.nn.Parameter(distribute_tensor(start[1].clone(), mesh, [Shard(0)]))]
    opt = ADOPT(params, **HYPER, **kernel)
    for t in range(steps):
        whole = tensor_parallel_grads(t)
        share = whole[0] * (rank + 1) / sum(range(1, world_size + 1))  # unequal shares summing to the whole
        params[0].grad = DTensor.from_local(share, mesh, [Partial()])
        params[1].grad = distribute_tensor(whole[1], mesh, [Shard(1)])
        opt.step()
    return {
        "params": [_full(p) for p in params],
        "state": [{k: _full(v) for k, v in opt.state[p].items()} for p in params],
        "grad_placements": [str(p.grad.placements) for p in params],
    }


def load_plain_state_into_fsdp2(rank: int, world_size: int, kernel: dict[str, Any], steps: int) -> dict[str, Any]:
    """``opt.load_state_dict`` of an unsharded run's state dict into an FSDP2 model's optimizer."""
    plain = make_model()
    plain_opt = ADOPT(plain.parameters(), **HYPER, **kernel)
    train(plain, plain_opt, range(steps))
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    try:
        opt.load_state_dict(plain_opt.state_dict())
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"error": error, "state_entries": len(opt.state)}


LATE = 4  # the step at which the last layer's bias first gets a gradient in the late-bias checkpoint test


def load_keeping_unsaved_params_stateless(path: str, model: torch.nn.Module, opt: ADOPT) -> None:
    """The README's recipe: ``load``, except that parameters without state in the checkpoint stay without."""
    reader = FileSystemReader(path)
    saved_keys = reader.read_metadata().state_dict_metadata.keys()
    model_sd, optim_sd = get_state_dict(model, opt)  # on a fresh optimizer: creates state for all
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, p in model.named_parameters():
        if f"optim.state.{name}.step" not in saved_keys:
            opt.state.pop(p, None)  # no state when saved: drop what get_state_dict's lr=0 call made
