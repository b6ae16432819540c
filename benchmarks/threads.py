"""How the fused CPU kernel should run its threads: on torch's OpenMP threads, or started per call.

Times one step of the installed kernel over 10M parameters (float32, or ``--dtype``) in 100 tensors on
torch's own OpenMP threads (what the library does where torch runs on libgomp) and on threads started
and joined in the call (what it does elsewhere), taking turns every round, in two situations: alone,
and right after a torch operation that leaves torch's OpenMP threads busy or spinning, as in training,
where the forward and backward passes run just before the step. Prints one table; the README quotes it
for the choice.

    python benchmarks/threads.py [--threads 2] [--steps 20] [--dtype float16] [--json PATH]

``--json PATH`` also writes the table (format of ``results_file.py``; ``results``: ``{"dtype",
"numel", "tensors", "rounds", "openmp_runtimes", "rows": [{"situation", "threads", "median_ms", "min_ms",
"ratio"}]}``, ``ratio`` being the median per round of the row's time over the package's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import results_file
import torch

from adoptim.kernels import fused_cpu

# name -> threads: 1 torch's OpenMP threads where found, 0 threads started per call (set before each step)
VARIANTS = {
    "torch's OpenMP threads (the package, where torch runs on libgomp)": 1,
    "threads started per call (the package elsewhere)": 0,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default="float32")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the table here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    lib = fused_cpu.library()
    if lib is None:
        raise SystemExit("the fused CPU kernel is not built")

    p, g, m, v = ([(torch.randn(100_000) * 0.01).to(dtype) for _ in range(100)] for _ in range(4))
    v = [x.abs() for x in v]
    steps = [torch.tensor(1.0) for _ in range(100)]
    table = fused_cpu._bulk_table(p, g, m, v, steps)
    busy_a, busy_b = torch.randn(4_000_000), torch.randn(4_000_000)

    def step(name: str) -> None:
        lib.adopt_cpu_openmp(VARIANTS[name])
        lib.adopt_cpu_step(100, table.buffer_info()[0], 1e-3, 0.9, 0.9999, 1e-6, 0.0, 0, 1, 0.25, 0, 0, 1.0,
                           args.threads)

    names = list(VARIANTS)
    found = lib.adopt_cpu_openmp(-1)
    if not lib.adopt_cpu_openmp(1):
        print("torch's libgomp is not loaded here: both rows start threads per call", file=sys.stderr)
    rows = []
    try:
        for situation in ("alone", "after a torch op"):
            times: dict[str, list[float]] = {name: [] for name in names}
            for name in names:
                step(name)  # warm-up
            # The variants take turns every round (each goes first in turn): this machine's speed drifts
            # within seconds, and rows timed one after the other would compare different machines.
            for r in range(args.steps):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    if situation != "alone":
                        torch.mul(busy_a, busy_b)  # torch's OpenMP threads were just working
                    t0 = time.perf_counter()
                    step(name)
                    times[name].append(time.perf_counter() - t0)
            base = times[names[0]]
            for name in names:
                ratio = statistics.median(a / b for a, b in zip(times[name], base))
                rows.append((situation, name, statistics.median(times[name]) * 1e3, min(times[name]) * 1e3, ratio))
    finally:
        lib.adopt_cpu_openmp(found)

    maps = Path("/proc/self/maps")
    lines = maps.read_text().splitlines() if maps.exists() else []
    gomp = sorted({line.split()[-1] for line in lines if "gomp" in line or "iomp" in line})
    print(f"\nOpenMP runtimes mapped in this process: {gomp or 'unknown'}")
    print(f"\n10M {args.dtype} parameters in 100 tensors, {args.threads} thread(s), {args.steps} rounds "
          f"(torch {torch.__version__}, load average {os.getloadavg()[0]:.1f})\n")
    print("| situation | threads | median ms | min ms | time / the package's, median per round |")
    print("|---|---|---:|---:|---:|")
    for situation, name, med, low, ratio in rows:
        print(f"| {situation} | {name} | {med:.2f} | {low:.2f} | {ratio:.2f} |")
    if args.json:
        keys = ("situation", "threads", "median_ms", "min_ms", "ratio")
        results_file.write(args.json, "threads", vars(args), {
            "dtype": args.dtype, "numel": 10_000_000, "tensors": 100, "rounds": args.steps,
            "openmp_runtimes": [Path(g).name for g in gomp],
            "rows": [dict(zip(keys, row)) for row in rows]}, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
