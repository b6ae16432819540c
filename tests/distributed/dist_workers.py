"""What each process of a multi-process test runs; every function returns plain tensors for rank 0 to check."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from dist_harness import HYPER, make_model, train
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


def fsdp2_model(world_size: int) -> torch.nn.Module:
    """The problem's model with each linear layer, and then the whole, sharded by FSDP2."""
    model = make_model()
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


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
    rank: int, world_size: int, kernel: dict[str, Any], path: str, first: int, total: int
) -> dict[str, Any]:
    """Train ``first`` steps, save a sharded checkpoint, then train on to ``total`` without stopping."""
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    train(model, opt, range(first), rank, world_size)
    _save(path, model, opt)
    train(model, opt, range(first, total), rank, world_size)
    return snapshot(model, opt)


def fsdp2_resume(
    rank: int, world_size: int, kernel: dict[str, Any], path: str, first: int, total: int
) -> dict[str, Any]:
    """A fresh process group: build the sharded model, load the checkpoint, train the remaining steps."""
    model = fsdp2_model(world_size)
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    load(path, model, opt)
    train(model, opt, range(first, total), rank, world_size)
    return snapshot(model, opt)
