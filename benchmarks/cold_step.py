"""Where a step of many small tensors goes when the caches are cold, as in a training loop.

Between two optimizer steps a training loop runs forward and backward passes, whose data evict the
optimizer's from the caches; ``step_time.py --head-to-head`` on layout (c) (1000 tensors of 1000
elements) sees the same, because the contenders taking turns evict each other's. This benchmark splits
such a step: before every timed call a STREAM-like pass over ``--evict-mb`` megabytes (more than the
last-level cache) evicts the caches, then it times, taking turns in every round:

- the bound: ``csrc/bandwidth.c``'s kernel with the step's memory traffic (28 bytes per element);
- ``ADOPT(fused=True).step()``, whole, and within the same steps its C kernel call alone (the rest is
  host work: torch's step wrapper, the kept lists' check, the dispatcher, the kernel's table);
- reading every parameter's ``.grad`` once (``list(map(attrgetter("grad"), params))``), cold, and at
  once again, warm: what any optimizer written in Python pays per tensor before it can step;
- torch's ``AdamW(fused=True).step()``.

It prints medians in ms and µs per tensor, and the host budget that a step at twice the bound leaves
(twice the bound minus the kernel call).

    python benchmarks/cold_step.py --rounds 30 --json benchmarks/results/cold_step.json

``--json PATH`` also writes the results (format of ``results_file.py``; ``results``: ``tensors``,
``numel``, ``rounds`` and ``times_ms``, per row name the times in round order).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path

import results_file
import torch
from render_docs import cold_step_table

import adoptim
from adoptim.kernels import fused_cpu
from adoptim.kernels.bandwidth import bandwidth_bound

ROWS = ("bound", "ADOPT(fused=True).step()", "  its C kernel call", "  the rest: host work",
        ".grad of every parameter, cold", ".grad of every parameter, warm", "torch AdamW(fused=True).step()")


class _TimedKernel:
    """The fused CPU library with its step call timed (everything else passes through)."""

    def __init__(self, lib: object) -> None:
        self._lib, self.seconds = lib, 0.0

    def __getattr__(self, name: str) -> object:
        return getattr(self._lib, name)

    def adopt_cpu_step(self, *args: object) -> int:
        t0 = time.perf_counter()
        out = self._lib.adopt_cpu_step(*args)
        self.seconds += time.perf_counter() - t0
        return out


def run(tensors: int, elements: int, rounds: int, evict_mb: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(elements, generator=gen) * 0.02 for _ in range(tensors)]
    grads = [torch.randn(elements, generator=gen) * 1e-3 for _ in range(tensors)]

    def model() -> list[torch.nn.Parameter]:
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return params

    lib = fused_cpu.library()
    if lib is None:
        raise SystemExit("the fused CPU kernel is not built: nothing to split")
    timed = _TimedKernel(lib)
    adopt_params, adamw_params = model(), model()
    adopt = adoptim.ADOPT(adopt_params, fused=True)
    adamw = torch.optim.AdamW(adamw_params, fused=True)
    for _ in range(3):
        adopt.step()
        adamw.step()
    bufs = [torch.full((tensors * elements,), 0.5) for _ in range(4)]
    evict = [torch.full((evict_mb * (1 << 20) // 16,), 0.5) for _ in range(4)]
    grad_of = attrgetter("grad")
    times: dict[str, list[float]] = {name: [] for name in ROWS}

    def timed_call(fn: Callable[[], object]) -> float:
        bandwidth_bound(*evict)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def adopt_step() -> None:
        timed.seconds = 0.0
        real = fused_cpu.library
        fused_cpu.library = lambda: timed  # the dispatcher looks the library up at every step
        try:
            ms = timed_call(adopt.step)
        finally:
            fused_cpu.library = real
        times["ADOPT(fused=True).step()"].append(ms)
        times["  its C kernel call"].append(timed.seconds * 1e3)
        times["  the rest: host work"].append(ms - timed.seconds * 1e3)

    def grad_reads() -> None:
        times[".grad of every parameter, cold"].append(timed_call(lambda: list(map(grad_of, adopt_params))))
        t0 = time.perf_counter()
        list(map(grad_of, adopt_params))
        times[".grad of every parameter, warm"].append((time.perf_counter() - t0) * 1e3)

    turns = [lambda: times["bound"].append(timed_call(lambda: bandwidth_bound(*bufs))), adopt_step, grad_reads,
             lambda: times["torch AdamW(fused=True).step()"].append(timed_call(adamw.step))]
    for r in range(rounds):
        k = r % len(turns)
        for turn in turns[k:] + turns[:k]:  # each goes first, second, ... in turn
            turn()
    if not all(len(t) == rounds for t in times.values()):
        raise RuntimeError("the kernel call was not timed in every step (did the step take another kernel?)")
    return {"tensors": tensors, "numel": tensors * elements, "rounds": rounds, "times_ms": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--elements", type=int, default=1000, help="per tensor")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--evict-mb", type=int, default=128, help="megabytes the eviction pass moves")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = run(args.tensors, args.elements, args.rounds, args.evict_mb)
    print(f"{args.tensors} tensors of {args.elements} float32 elements, {args.threads} thread(s), "
          f"{args.rounds} rounds taking turns, caches evicted before every timed call\n")
    print("\n".join(cold_step_table(res)))
    if args.json:
        results_file.write(args.json, "cold_step", vars(args), res, threads=args.threads)


if __name__ == "__main__":
    main()
