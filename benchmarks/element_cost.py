"""Arithmetic cost of the fused CPU kernel per element, per dtype, with the data in cache.

One tensor of ``--elements`` elements (16384 by default: p, g, m and v of float32 take 256 KiB, in L2)
is stepped ``--calls`` times through the C library directly, on one thread, and so is one of 16
elements: the difference per element leaves out memory bandwidth, Python's host work and the fixed cost
of a call (printed beside it), so what is left is the loop's arithmetic and conversions.
float16 is timed through both of its paths (the CPU's F16C conversions where it has them, and the
portable integer conversions). Prints the best of ``--repeats`` repeats, in ns per element.

    python benchmarks/element_cost.py
    python benchmarks/element_cost.py --json benchmarks/results/element_cost.json

``--json PATH`` also writes the rows (format of ``results_file.py``; ``results``: ``{"small": 16,
"rows": [{"dtype": ..., "ns_per_element": ..., "fixed_us": ...}]}``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import results_file
import torch

from adoptim.kernels import fused_cpu


def _call_seconds(dtype: torch.dtype, elements: int, calls: int, repeats: int) -> float:
    """Best time of one C call (one tensor of ``elements`` elements, one thread), over ``repeats``."""
    lib = fused_cpu.library()
    gen = torch.Generator().manual_seed(0)
    lists = ([torch.randn(elements, generator=gen).to(dtype)], [torch.randn(elements, generator=gen).to(dtype)],
             [torch.zeros(elements, dtype=dtype)], [torch.ones(elements, dtype=dtype)], [torch.tensor(3.0)])
    table = fused_cpu._bulk_table(*lists)
    address, _ = table.buffer_info()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            # lr, beta1, beta2, eps, weight decay, decoupled, clip, clip exponent, maximize, scaled, scale, threads
            lib.adopt_cpu_step(1, address, 1e-3, 0.9, 0.9999, 1e-6, 0.0, 0, 1, 0.25, 0, 0, 1.0, 1)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


SMALL = 16  # a call this small is nearly all fixed cost: ctypes' argument conversion, the checks, mallocs


def ns_per_element(dtype: torch.dtype, elements: int, calls: int, repeats: int) -> tuple[float, float]:
    """The slope (ns per element) between a call of ``SMALL`` and one of ``elements`` elements, and the
    fixed cost of a call (µs): the slope leaves the per-call cost out."""
    small = _call_seconds(dtype, SMALL, calls, repeats)
    big = _call_seconds(dtype, elements, calls, repeats)
    return (big - small) / (elements - SMALL) * 1e9, small * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=16384)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows here")
    args = parser.parse_args()
    lib = fused_cpu.library()
    if lib is None:
        raise SystemExit("the fused CPU kernel is not built")
    torch.set_num_threads(1)
    f16c = lib.adopt_cpu_f16c(-1)
    rows = [("float32", torch.float32, f16c), ("float64", torch.float64, f16c), ("bfloat16", torch.bfloat16, f16c)]
    if f16c:
        rows.append(("float16, F16C conversions", torch.float16, 1))
    rows.append(("float16, portable conversions", torch.float16, 0))
    print(f"| dtype | ns per element (one thread, slope from {SMALL} to {args.elements} elements, best of "
          f"{args.repeats}) | fixed cost of a call, µs |")
    print("|---|---:|---:|")
    measured = []
    try:
        for name, dtype, path in rows:
            lib.adopt_cpu_f16c(path)
            slope, fixed = ns_per_element(dtype, args.elements, args.calls, args.repeats)
            print(f"| {name} | {slope:.2f} | {fixed:.2f} |")
            measured.append({"dtype": name, "ns_per_element": slope, "fixed_us": fixed})
    finally:
        lib.adopt_cpu_f16c(f16c)
    if args.json:
        results_file.write(args.json, "element_cost", vars(args), {"small": SMALL, "rows": measured}, threads=1)


if __name__ == "__main__":
    main()
