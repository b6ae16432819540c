"""Where a first step's time goes: adoptim's fused step against torch's fused AdamW, taking turns.

A first step differs from a steady one by the state it creates. For each layout of ``step_time.py``
this runs ``--rounds`` rounds; in each, adoptim's ``ADOPT(fused=True)`` and torch's
``AdamW(fused=True)`` (which goes first alternates) each get fresh parameters, take a first step and
then ``--steps`` steady steps. adoptim's first step is split into its parts: ``_collect`` without the
state (checks and lists), ``_create_state`` (the state tensors and dicts: allocation, including any
fresh pages the operating system must zero) and the kernel call. Printed: medians over the rounds, in
ms, and the per-round ratio of the first step to the median steady step.

    python benchmarks/first_step.py                    # layouts b and c, 15 rounds
    python benchmarks/first_step.py --layouts c --rounds 40
    python benchmarks/first_step.py --json benchmarks/results/first_step.json

``--json PATH`` also writes the results (format of ``results_file.py``; ``results``: one
``{"layout", "title", "numel", "rounds", "optimizers": {name: {"first_ms": [...], "steady_ms": [...]}},
"parts_ms": {part: [...]}}`` per layout, one value per round; the parts are adoptim's, with ``other``
the first step less its timed parts).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import results_file
import torch

import adoptim
import adoptim.optimizer as adopt_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import LAYOUTS  # noqa: E402  (the same layouts as the step-time tables)


def _timed(parts: dict[str, float], name: str, fn: Callable) -> Callable:
    def wrapper(*args: object, **kwargs: object) -> object:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def one_round(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], base: list[torch.Tensor],
              grads: list[torch.Tensor], steps: int, split: bool) -> tuple[float, float, dict[str, float]]:
    """First-step seconds, median steady-step seconds, and (when ``split``) the parts of the first step."""
    params = [torch.nn.Parameter(b.clone()) for b in base]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt = make(params)
    parts: dict[str, float] = {}
    kernel = adopt_optimizer.adopt
    if split:  # instance attributes shadow the methods for this optimizer only
        opt._init_group = _timed(parts, "collect", opt._init_group)
        opt._create_state = _timed(parts, "create state", opt._create_state)
        adopt_optimizer.adopt = _timed(parts, "kernel", kernel)
    gc.collect()
    try:
        t0 = time.perf_counter()
        opt.step()
        first = time.perf_counter() - t0
    finally:
        adopt_optimizer.adopt = kernel
        if split:  # steady steps untimed by part
            del opt._init_group, opt._create_state
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="bc", help="any of a, b, c")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steady steps per round (median used)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    makers = {
        "adoptim ADOPT fused": lambda ps: adoptim.ADOPT(ps, lr=1e-3, fused=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    tables = []
    for key in args.layouts:
        title, shapes = LAYOUTS[key]
        gen = torch.Generator().manual_seed(0)
        base = [torch.randn(s, generator=gen) for s in shapes()]
        grads = [torch.randn(s, generator=gen) for s in shapes()]
        results: dict[str, list] = {name: [] for name in makers}
        for r in range(args.rounds):
            order = list(makers) if r % 2 == 0 else list(makers)[::-1]
            for name in order:
                print(f"[{key}] round {r + 1}/{args.rounds} {name}", file=sys.stderr, flush=True)
                results[name].append(one_round(makers[name], base, grads, args.steps, name.startswith("adoptim")))
        n = sum(b.numel() for b in base)
        print(f"\n#### ({key}) {title}: {n / 1e6:.1f}M parameters, float32, cpu, {args.threads} thread(s), "
              f"{args.rounds} rounds\n")
        print("| optimizer | first step ms | steady step ms | first / steady, per round (quartiles) |")
        print("|---|---:|---:|---|")
        for name, rows in results.items():
            ratios = sorted(f / s for f, s, _ in rows)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            print(f"| {name} | {statistics.median(f for f, _, _ in rows) * 1e3:.1f} | "
                  f"{statistics.median(s for _, s, _ in rows) * 1e3:.1f} | "
                  f"{statistics.median(ratios):.2f} ({q[0]:.2f} to {q[2]:.2f}) |")
        parts = results["adoptim ADOPT fused"]
        names = list(parts[0][2])
        # "other": per round, the first step less its timed parts (torch's step wrapper, hooks, the
        # dispatcher's own work), so the medians can be checked to account for the whole step.
        other = statistics.median(f - sum(p.values()) for f, _, p in parts)
        print("\nadoptim's first step, medians: " + ", ".join(
            f"{name} {statistics.median(p[name] for _, _, p in parts) * 1e3:.2f} ms" for name in names)
            + f", other {other * 1e3:.2f} ms")
        tables.append({
            "layout": key, "title": title, "numel": n, "rounds": args.rounds,
            "optimizers": {name: {"first_ms": [f * 1e3 for f, _, _ in rows], "steady_ms": [s * 1e3 for _, s, _ in rows]}
                           for name, rows in results.items()},
            "parts_ms": {**{name: [p[name] * 1e3 for _, _, p in parts] for name in names},
                         "other": [(f - sum(p.values())) * 1e3 for f, _, p in parts]},
        })
    if args.json:
        results_file.write(args.json, "first_step", vars(args), tables, threads=args.threads)


if __name__ == "__main__":
    main()
