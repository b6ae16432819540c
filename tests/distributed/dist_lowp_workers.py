"""The problem and the per-process functions of the low-precision-state tests (``state_precision``).

A float32 MLP (16 -> 8 -> 5) whose two weights keep 8-bit or bfloat16 state in blocks of 8 (its biases,
under ``state_min_size``, full state). Each weight's rows (16 and 8 elements) are whole blocks, so FSDP2's
shards of them (dim 0: 4 + 4 and 3 + 2 rows on two processes, 2 + 2 + 1 + 0 of the second on four, an empty
shard) hold whole blocks of the unsharded weight.

Two kinds of gradient: ``train`` runs the model on each process's share of the global batch (DDP and FSDP2
average the shares), ``train_fixed`` sets every parameter's gradient to a fixed tensor of the step, the same
whole tensor on any number of processes (no summation, so a run on 1, 2 or 4 processes sees the same bits).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from dist_harness import HYPER, local_slice
from dist_workers import load, shard_fsdp2, snapshot
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from adoptim import ADOPT

IN, HIDDEN, OUT, BATCH = 16, 8, 5, 12
BLOCK = 8
LOWP = dict(state_block_size=BLOCK, state_min_size=32)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))


def make_opt(model: torch.nn.Module, precision: str) -> ADOPT:
    return ADOPT(model.parameters(), **HYPER, state_precision=precision, **LOWP)


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4000 + t)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def share_grads(model: torch.nn.Module, t: int, rank: int, world_size: int) -> None:
    """Backward of process ``rank``'s share of step ``t``'s global batch (into ``.grad``)."""
    x, y = batch(t)
    part = local_slice(rank, world_size)
    torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()


def train(model: torch.nn.Module, opt: ADOPT, steps: range, rank: int, world_size: int) -> None:
    for t in steps:
        opt.zero_grad(set_to_none=True)
        share_grads(model, t, rank, world_size)
        opt.step()


def fixed_grads(t: int, shapes: list[torch.Size]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5000 + t)
    return [torch.randn(s, generator=g) for s in shapes]


def train_fixed(model: torch.nn.Module, opt: ADOPT, steps: range) -> None:
    params = list(model.parameters())
    for t in steps:
        for p, g in zip(params, fixed_grads(t, [p.shape for p in params])):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()


def averaged_run(precision: str, steps: int, world_size: int) -> tuple[list[torch.Tensor], ADOPT]:
    """The expectation of a data-parallel run, in one process: each step's gradient is the mean of the
    processes' share gradients, summed in rank order and divided by their number (with two processes the
    same bits as DDP's and FSDP2's all-reduce, whichever way round it adds and divides)."""
    model = make_model()
    opt = make_opt(model, precision)
    params = list(model.parameters())
    for t in range(steps):
        shares = []
        for rank in range(world_size):
            model.zero_grad(set_to_none=True)
            share_grads(model, t, rank, world_size)
            shares.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            p.grad = sum(s[i] for s in shares) / world_size
        opt.step()
    return [p.detach().clone() for p in params], opt


def fixed_run(precision: str, steps: int) -> tuple[list[torch.Tensor], ADOPT]:
    model = make_model()
    opt = make_opt(model, precision)
    train_fixed(model, opt, range(steps))
    return [p.detach().clone() for p in model.parameters()], opt


def save(path: str, model: torch.nn.Module, opt: ADOPT) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def ddp(rank: int, world_size: int, precision: str, path: str, first: int, total: int) -> dict[str, Any]:
    """DDP: train ``first`` steps, save a checkpoint, train on to ``total``."""
    model = DistributedDataParallel(make_model())
    opt = make_opt(model, precision)
    train(model, opt, range(first), rank, world_size)
    save(path, model, opt)
    train(model, opt, range(first, total), rank, world_size)
    return snapshot(model.module, opt)


def ddp_resume(rank: int, world_size: int, precision: str, path: str, first: int, total: int) -> dict[str, Any]:
    model = DistributedDataParallel(make_model())
    opt = make_opt(model, precision)
    load(path, model, opt)
    train(model, opt, range(first, total), rank, world_size)
    return snapshot(model.module, opt)


def fsdp2_model(world_size: int) -> torch.nn.Module:
    return shard_fsdp2(make_model(), world_size)


def _layout(model: torch.nn.Module, opt: ADOPT) -> dict[str, Any]:
    """How each parameter's state is held in this process: keys, and per tensor (dtype, DTensor?, local shape)."""
    out = []
    for p in model.parameters():
        st = opt.state[p]
        out.append({k: (v.dtype, isinstance(v, DTensor), tuple(v.to_local().shape) if isinstance(v, DTensor)
                        else tuple(v.shape)) for k, v in st.items()})
    return {"layout": out, "local_rows": [p.to_local().shape[0] for p in model.parameters()]}


def fsdp2(rank: int, world_size: int, precision: str, steps: int) -> dict[str, Any]:
    """FSDP2 with real backward passes on each process's share of the batch."""
    model = fsdp2_model(world_size)
    opt = make_opt(model, precision)
    train(model, opt, range(steps), rank, world_size)
    return {**snapshot(model, opt), **_layout(model, opt), "unaligned": unaligned(world_size, precision)}


def unaligned(world_size: int, precision: str) -> list[dict[str, Any]]:
    """The state kept for sharded parameters whose rows are not whole blocks (12 elements, a 1-D one)."""
    mesh = init_device_mesh("cpu", (world_size,))
    out = []
    for shape in ((4, 12), (40,)):
        g = torch.Generator().manual_seed(7)
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), mesh, [Shard(0)]))
        opt = ADOPT([p], state_precision=precision, state_block_size=BLOCK, state_min_size=0)
        p.grad = distribute_tensor(torch.randn(shape, generator=g), mesh, [Shard(0)])
        opt.step()
        out.append({k: (v.dtype, isinstance(v, DTensor)) for k, v in opt.state[p].items()})
    return out


def fsdp2_fixed(rank: int, world_size: int, precision: str, path: str | None, first: int, total: int,
                resume: bool) -> dict[str, Any]:
    """FSDP2 with fixed gradients: train to ``first``, save (``path``), go on to ``total``; or, with
    ``resume``, load ``path`` and train from ``first`` to ``total``."""
    model = fsdp2_model(world_size)
    opt = make_opt(model, precision)
    if resume:
        load(path, model, opt)
    else:
        train_fixed(model, opt, range(first))
        save(path, model, opt)
    train_fixed(model, opt, range(first, total))
    return {**snapshot(model, opt), **_layout(model, opt)}


def fsdp2_gathered(rank: int, world_size: int, precision: str, first: int) -> dict[str, Any]:
    """Train ``first`` steps with fixed gradients; the whole state dicts (``full_state_dict=True``) on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = fsdp2_model(world_size)
    opt = make_opt(model, precision)
    train_fixed(model, opt, range(first))
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": model_sd, "optim": optim_sd} if rank == 0 else None


def fsdp2_bad_state(rank: int, world_size: int, precision: str, steps: int) -> dict[str, Any]:
    """``opt.load_state_dict`` of state that does not fit the shards: the errors, and whether anything changed."""
    model = fsdp2_model(world_size)
    opt = make_opt(model, precision)
    train_fixed(model, opt, range(steps))
    before = snapshot(model, opt)
    weight = next(model.parameters())
    errors = {}
    good = opt.state_dict()
    key = "exp_avg_absmax" if precision == "8bit" else "exp_avg"
    for case in ("wrong shape", "plain tensor"):
        sd = {**good, "state": {k: dict(v) for k, v in good["state"].items()}}
        t = sd["state"][0][key]
        if case == "wrong shape":  # the scales (or values) of another block size: one column more per row
            local = t.to_local()
            wrong = torch.cat([local, local[:, :1]], dim=1)
            sd["state"][0][key] = DTensor.from_local(wrong, weight.device_mesh, weight.placements, run_check=False,
                                                     shape=(t.shape[0], t.shape[1] + 1), stride=(t.shape[1] + 1, 1))
        else:  # an unsharded run's flat tensor
            sd["state"][0][key] = t.full_tensor().reshape(-1)
        try:
            opt.load_state_dict(sd)
            errors[case] = None
        except ValueError as exc:
            errors[case] = str(exc)
    after = snapshot(model, opt)
    same_params = all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    same_state = all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                     for x, y in zip(before["state"], after["state"]))
    unchanged = same_params and same_state
    return {"errors": errors, "unchanged": unchanged}


def fsdp2_load_into(rank: int, world_size: int, precision: str, path: str) -> dict[str, Any]:
    """Load the checkpoint at ``path`` through DCP into an FSDP2 model whose optimizer keeps ``precision``
    state: the error, and whether the optimizer's state changed."""
    model = fsdp2_model(world_size)
    opt = make_opt(model, precision)
    train_fixed(model, opt, range(1))
    before = snapshot(model, opt)["state"]
    try:
        load(path, model, opt)
        error = kind = None
    except (Exception, CheckpointException) as exc:  # which one it is is the result (DCP's is a BaseException)
        error, kind = str(exc), type(exc).__name__
    after = snapshot(model, opt)["state"]
    unchanged = all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(before, after))
    return {"error": error, "kind": kind, "unchanged": unchanged}
