"""How the fused CPU kernel should start its threads: POSIX threads per call, or OpenMP.

Builds the kernel's C source twice with the system C compiler (the package's way, POSIX threads started
per call; and an OpenMP build of the same loops), then times one step over 10M float32 parameters in
100 tensors with each, in two situations: alone, and right after a torch operation that keeps torch's
own OpenMP threads busy, as in training, where the forward and backward passes run just before the step.
Prints one table; the README quotes it for the choice.

    python benchmarks/threads.py [--threads 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parents[1] / "src" / "adoptim" / "kernels" / "csrc" / "adopt_cpu.c"
VARIANTS = {
    "POSIX threads (the package)": ["-pthread"],
    "OpenMP (libgomp)": ["-fopenmp", "-DADOPT_OPENMP"],
}


def build(flags: list[str], out: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O3", "-fno-math-errno", "-fPIC", "-shared", *flags, str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(out))
    lib.adopt_cpu_step.restype = ctypes.c_int
    lib.adopt_cpu_step.argtypes = [
        ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double,
        ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int,
        ctypes.c_double, ctypes.c_int,
    ]
    return lib


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    p, g, m, v = ([torch.randn(100_000) * 0.01 for _ in range(100)] for _ in range(4))
    v = [x.abs() for x in v]
    steps = [torch.tensor(1.0) for _ in range(100)]
    table = array("q", [x.data_ptr() for x in (*p, *g, *m, *v, *steps)] + [100_000] * 100 + [0] * 100)
    busy_a, busy_b = torch.randn(4_000_000), torch.randn(4_000_000)

    def step(lib: ctypes.CDLL) -> None:
        lib.adopt_cpu_step(100, table.buffer_info()[0], 1e-3, 0.9, 0.9999, 1e-6, 0.0, 0, 1, 0.25, 0, 0, 1.0,
                           args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        libs = {name: build(flags, Path(tmp) / f"v{i}.so") for i, (name, flags) in enumerate(VARIANTS.items())}
        for situation in ("alone", "after a torch op"):
            for name, lib in libs.items():
                step(lib)
                times = []
                for _ in range(args.steps):
                    if situation != "alone":
                        torch.mul(busy_a, busy_b)  # torch's OpenMP threads were just working
                    t0 = time.perf_counter()
                    step(lib)
                    times.append(time.perf_counter() - t0)
                rows.append((situation, name, statistics.median(times) * 1e3, min(times) * 1e3))

    maps = Path("/proc/self/maps")
    lines = maps.read_text().splitlines() if maps.exists() else []
    gomp = sorted({line.split()[-1] for line in lines if "gomp" in line or "iomp" in line})
    print(f"\nOpenMP runtimes mapped in this process: {gomp or 'unknown'}")
    print(f"\n10M float32 parameters in 100 tensors, {args.threads} thread(s), median of {args.steps} steps "
          f"(torch {torch.__version__}, load average {os.getloadavg()[0]:.1f})\n")
    print("| situation | threads | median ms | min ms |")
    print("|---|---|---:|---:|")
    for situation, name, med, low in rows:
        print(f"| {situation} | {name} | {med:.2f} | {low:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
