"""Shared pieces of the multi-process tests: the kernels, a bounded launcher, and the problem.

Workers start from a fork server that imported torch, FSDP2 and adoptim once: a 2-process run then
starts in well under a second instead of re-importing torch in every child, and, unlike forking the
test process itself (which has other threads, e.g. pytest-xdist's), no child inherits a lock that
some other thread held at the fork. Rendezvous uses a TCPStore that the test process opens on a free
port (port 0), so parallel test workers never collide.

The problem is a small float64 MLP whose layers have first dimensions 5 and 1: with two processes,
FSDP2 shards them unevenly (3 + 2 rows) and gives the second process an empty shard of the last layer.
Every process takes an equal contiguous share of each global batch, so the averaged gradient of a
data-parallel run is the gradient of the whole global batch, which the single-process run uses.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adoptim import ADOPT
from adoptim.reference import ReferenceADOPT

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 processes
IN, HIDDEN, OUT = 6, 5, 1
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=0.25)

# Why the comparisons use 1e-12: everything is float64, and a data-parallel run differs from the
# single-process one only in how the batch-mean gradient is summed (per-process means averaged by an
# all-reduce, against one mean over the global batch): a few ulp (~1e-17 here). ADOPT is elementwise and
# its clip bounds the normalised gradient, so six steps keep that at ulp level (2.8e-17 measured). An
# actual fault (a skipped or doubled step, a step counter shared across shards, summed instead of averaged
# gradients, state from the wrong shard) moves a parameter by about lr * (1 - beta1) = 3e-3.
ATOL = 1e-12


def _accepts(flags: dict[str, Any]) -> bool:
    try:
        ADOPT([torch.zeros(1, requires_grad=True)], **flags)
    except (TypeError, ValueError):
        return False
    return True


# Checked when the tests are collected: the fused kernel joins as soon as the constructor accepts it.
KERNELS = [
    pytest.param({}, id="default"),  # what a user gets without flags (the fused kernel on the CPU, if built)
    pytest.param({"foreach": False}, id="forloop"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({"foreach": False, "capturable": True}, id="forloop-capturable"),
    pytest.param({"foreach": True, "capturable": True}, id="foreach-capturable"),
    pytest.param(
        {"fused": True},
        id="fused",
        marks=pytest.mark.skipif(not _accepts({"fused": True}), reason="ADOPT(fused=True) is not accepted"),
    ),
]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)


# Imported once by the fork server (FSDP2 imports torch._dynamo lazily, which alone takes seconds).
# Only modules on the default path: the fork server of Python 3.11 ignores this process's sys.path.
mp.get_context("forkserver").set_forkserver_preload(
    ["pytest", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.optim"]
    + ["adoptim"]
)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    ).to(torch.float64)


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of step ``t``: inputs and targets, the same in every process and every run."""
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g, dtype=torch.float64)
    return x, torch.randn(GLOBAL_BATCH, OUT, generator=g, dtype=torch.float64)


def local_slice(rank: int, world_size: int) -> slice:
    share = GLOBAL_BATCH // world_size
    return slice(rank * share, (rank + 1) * share)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world_size: int = 1,
          bias_unused_until: int = 0) -> None:
    """Run the given global steps; each process uses its slice of every global batch.

    ``bias_unused_until``: the last layer's bias gets no gradient before that step (an unused branch).
    """
    part = local_slice(rank, world_size)
    for t in steps:
        x, y = batch(t)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
        loss.backward()
        if t < bias_unused_until:
            model[2].bias.grad = None
        opt.step()


def single_process(kernel: dict[str, Any], steps: int) -> tuple[list[torch.Tensor], ADOPT]:
    """The expectation: the same kernel in one process on the whole global batch."""
    model = make_model()
    opt = ADOPT(model.parameters(), **HYPER, **kernel)
    train(model, opt, range(steps))
    return [p.detach().clone() for p in model.parameters()], opt


def reference_run(steps: int) -> list[torch.Tensor]:
    """The float64 per-element reference (:mod:`adoptim.reference`) trained on the global batches."""
    model = make_model()
    params = list(model.parameters())
    hyper = {k: v for k, v in HYPER.items() if k != "betas"}
    ref = ReferenceADOPT(params, beta1=HYPER["betas"][0], beta2=HYPER["betas"][1], **hyper)
    for t in range(steps):
        with torch.no_grad():
            for p, q in zip(params, ref.params()):
                p.copy_(q)
        model.zero_grad(set_to_none=True)
        x, y = batch(t)
        torch.nn.functional.mse_loss(model(x), y).backward()
        ref.step([p.grad for p in params])
    return ref.params()


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=0, msg=lambda m, i=i: f"{what}, tensor {i}: {m}")


def _entry(
    rank: int, fn: Callable[..., Any], port: int, world_size: int, out_dir: str, timeout: float, args: tuple
) -> None:
    # A process that hangs prints where it hangs, then exits, so the test fails with a diagnosis.
    faulthandler.dump_traceback_later(timeout, exit=True)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Written atomically: a reader never sees half a result.
    tmp = Path(out_dir) / f".rank{rank}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, Path(out_dir) / f"rank{rank}.pkl")


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` forked processes; return their results.

    The processes share a gloo process group. A child's exception is re-raised here with its
    traceback; a run that outlives ``timeout`` seconds is killed and fails the test.
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry, args=(fn, store.port, world_size, out_dir, 0.8 * timeout, args), nprocs=world_size, join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size}-process run of {fn.__name__} took longer than {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results
