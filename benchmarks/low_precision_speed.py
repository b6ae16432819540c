"""Step time of ADOPT with 8-bit and bfloat16 state on the CPU, against torch's fused AdamW and 8-bit peers.

For each layout of ``step_time.py`` ((a) GPT-2 small, (b) 100 tensors of 100,000 elements, (c) 1000
tensors of 1000 elements; float32), every contender takes its first step (timed: state allocation and
any compilation included) and ``--warmup`` more, then ``--rounds`` rounds in which each contender and
each bound steps once, taking turns (each goes first, second, ... in turn), so that all run under the
same conditions on a shared machine. Reported per contender: the median step, the first step, the bytes
of optimizer state per parameter (counted from its state tensors, step counters left out), the fraction
of a bound with the same memory traffic (the median per round of bound time over step time), and the
ratio to torch's ``AdamW(fused=True)`` (the median per round), and the peak resident memory of a
process of its own that builds the layout's parameters and gradients, then the contender, and steps it
``1 + --warmup`` times (``VmHWM`` of ``/proc/self/status``, with the part above what the parameters and
gradients took before the optimizer was built: its state and whatever its steps allocate at their
peak). The bound is ``csrc/bandwidth.c``'s STREAM-like kernel (28 bytes per float32 element) over as
many elements as carry the contender's traffic: 28 bytes per element of full state, 16 + 16/256 of
8-bit state (p read and written, g read, two codes read and written, their scales), 20 of bfloat16
state; tensors under 4096 elements keep full state in ADOPT and in the peers. The peers (bitsandbytes'
and torchao's ``AdamW8bit``) are timed where they import; torchao's step is compiled with
``torch.compile`` in its first step.

    python benchmarks/low_precision_speed.py --json benchmarks/results/low_precision_speed/cpu.json
    python benchmarks/low_precision_speed.py --render benchmarks/results/low_precision_speed/cpu.json \\
        --page docs/low_precision.md

``--page`` rewrites the part of the page between ``<!-- results: low_precision_speed -->`` and
``<!-- /results: low_precision_speed -->``. The results file (format of ``results_file.py``) holds, per
layout key, ``layout`` (title, tensors, numel), ``rounds``, ``contenders`` (per name: ``storage``,
``traffic_bytes``, ``first_ms``, ``state_bytes_per_param``, ``times_ms`` in round order, or ``error``)
and ``bounds`` (per storage: ``traffic_bytes``, ``times_ms``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import results_file
import step_time
import torch

from adoptim import ADOPT

BLOCK = "low_precision_speed"
MIN_SIZE = 4096  # ADOPT's state_min_size and the peers' smallest quantized tensor
BYTES = {"full": 28.0, "8bit": 16.0 + 4 * 4 / 256, "bfloat16": 20.0}  # memory traffic per element of a step


def contenders() -> dict[str, tuple[Callable | str, str]]:
    """name -> (factory, or why there is none; the storage whose traffic bounds it)."""
    out: dict[str, tuple[Callable | str, str]] = {
        "torch AdamW fused": (lambda p: torch.optim.AdamW(p, fused=True), "full"),
        "ADOPT fused, full state": (lambda p: ADOPT(p, fused=True), "full"),
        "ADOPT bfloat16 state": (lambda p: ADOPT(p, state_precision="bfloat16"), "bfloat16"),
        "ADOPT 8bit state": (lambda p: ADOPT(p, state_precision="8bit"), "8bit"),
    }
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = (lambda p: bnb.optim.AdamW8bit(p), "8bit")
    except Exception as exc:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        out["bitsandbytes AdamW8bit"] = (f"not installed ({type(exc).__name__})", "8bit")
    try:
        from torchao.optim import AdamW8bit

        out["torchao AdamW8bit (torch.compile)"] = (lambda p: AdamW8bit(p), "8bit")
    except Exception as exc:  # noqa: BLE001
        out["torchao AdamW8bit (torch.compile)"] = (f"not installed ({type(exc).__name__})", "8bit")
    return out


def _tensors(x: object) -> list[torch.Tensor]:
    """The plain tensors of a state value (a tensor subclass, as torchao's, by its inner tensors)."""
    if not torch.is_tensor(x):
        return []
    if type(x) not in (torch.Tensor, torch.nn.Parameter) and hasattr(x, "__tensor_flatten__"):
        names, _ = x.__tensor_flatten__()
        return [t for n in names for t in _tensors(getattr(x, n))]
    return [x]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors, step counters left out."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, v in st.items() if k != "step"
               for t in _tensors(v))


def traffic(numels: list[int], storage: str) -> float:
    """Bytes one step moves over tensors of ``numels`` elements."""
    return sum(n * BYTES["full" if n < MIN_SIZE else storage] for n in numels)


def _status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (kB there) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_child(key: str, name: str, warmup: int) -> dict[str, float]:
    """In this process (started for it alone): layout ``key``'s parameters and gradients, then contender
    ``name``, stepped ``1 + warmup`` times; the peak resident memory (MiB) and what of it was there before
    the optimizer was built."""
    _, shapes_fn = step_time.LAYOUTS[key]
    factory, _ = contenders()[name]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes_fn()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    # What a first step loads once per process (imports, libraries, tables) is not the optimizer's memory:
    # a throwaway copy of the contender steps a small tensor (above the low-precision size) first.
    small = torch.nn.Parameter(torch.zeros(2 * MIN_SIZE))
    small.grad = torch.ones(2 * MIN_SIZE)
    warm = factory([small])
    for _ in range(2):
        warm.step()
    del warm, small
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # what the throwaway freed goes back to the system (glibc keeps it else)
    # The peaks before this point are not the optimizer's either: "5" resets VmHWM to VmRSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    opt = factory(params)
    for _ in range(1 + warmup):
        opt.step()
    return {"peak_rss_mb": _status_mb("VmHWM"), "base_rss_mb": base}


def peak_rss(key: str, name: str, warmup: int, threads: int) -> dict[str, float | str]:
    """:func:`peak_rss_child` run in a new process (the peak of this one holds every contender's)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", key, name, "--warmup", str(warmup),
           "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"rss_error": f"failed: {tail}"[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_layout(key: str, rounds: int, warmup: int, threads: int = 1, rss: bool = True) -> dict:
    from adoptim.kernels.bandwidth import bandwidth_bound

    title, shapes_fn = step_time.LAYOUTS[key]
    shapes = shapes_fn()
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    numels = [b.numel() for b in base]
    numel = sum(numels)
    out: dict = {"layout": {"title": title, "tensors": len(shapes), "numel": numel}, "rounds": rounds,
                 "contenders": {}, "bounds": {}}
    steps: dict[str, Callable[[], object]] = {}
    for name, (factory, storage) in contenders().items():
        row = out["contenders"][name] = {"storage": storage, "traffic_bytes": traffic(numels, storage)}
        if not callable(factory):
            row["error"] = factory
            continue
        print(f"[{key}] {name}: first step", file=sys.stderr, flush=True)
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        gc.collect()
        try:
            opt = factory(params)
            t0 = time.perf_counter()
            opt.step()
            row["first_ms"] = 1e3 * (time.perf_counter() - t0)
            for _ in range(warmup):
                opt.step()
        except Exception as exc:  # noqa: BLE001 - a peer failing here is reported, not fatal
            row["error"] = f"failed: {type(exc).__name__}: {exc}"[:200]
            continue
        row["state_bytes_per_param"] = state_bytes(opt) / numel
        steps[name] = opt.step
    if rss and sys.platform.startswith("linux"):
        for name, row in out["contenders"].items():
            if "error" not in row:
                print(f"[{key}] {name}: peak RSS in a process of its own", file=sys.stderr, flush=True)
                row.update(peak_rss(key, name, warmup, threads))
    for storage in BYTES:
        n32 = int(traffic(numels, storage) // 28)  # elements of the 28-byte kernel with the same traffic
        bufs = [torch.full((n32,), 0.5) for _ in range(4)]
        steps["bound " + storage] = lambda bufs=bufs: bandwidth_bound(*bufs)
        steps["bound " + storage]()
        out["bounds"][storage] = {"traffic_bytes": n32 * 28.0}
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    print(f"[{key}] {rounds} rounds of {len(names)}", file=sys.stderr, flush=True)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(1e3 * (time.perf_counter() - t0))
    for name in names:
        target = out["bounds"][name[len("bound "):]] if name.startswith("bound ") else out["contenders"][name]
        target["times_ms"] = times[name]
    return out


def render(doc: dict) -> str:
    """The Markdown of a results file: where it was measured, then one table per layout."""
    from render_docs import _table, provenance

    lines = ["Measured by " + provenance(doc), ""]
    for key, res in doc["results"].items():
        lay, bounds = res["layout"], res["bounds"]
        ref = res["contenders"]["torch AdamW fused"].get("times_ms")
        lines += [f"**({key}) {lay['title']}**: {lay['numel'] / 1e6:.1f}M float32 parameters, "
                  f"{doc['machine']['torch_threads']} thread(s), {res['rounds']} rounds taking turns; "
                  "ratios are medians of the per-round ratios", ""]
        rows = []
        for name, row in res["contenders"].items():
            if "times_ms" not in row:
                rows.append([name, row.get("error", "not run"), "", "", "", "", "", ""])
                continue
            t, b = row["times_ms"], bounds[row["storage"]]["times_ms"]
            rows.append([name, f"{statistics.median(t):.1f}", f"{row['first_ms']:.1f}",
                         f"{row['state_bytes_per_param']:.3f}",
                         f"{statistics.median(b):.1f} ({row['traffic_bytes'] / lay['numel']:.1f})",
                         f"{statistics.median(x / y for x, y in zip(b, t, strict=True)):.2f}",
                         f"{statistics.median(x / y for x, y in zip(t, ref, strict=True)):.2f}" if ref else "n/a",
                         _rss_cell(row)])
        lines += _table(["optimizer", "step ms", "first-step ms", "bytes of state / param",
                         "bound ms (bytes moved / param)", "of bound", "vs AdamW fused",
                         "peak RSS MiB (above params + grads)"], "lrrrrrrr", rows) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _rss_cell(row: dict) -> str:
    """The peak RSS cell of a contender's row: total and the part above the parameters and gradients."""
    if "peak_rss_mb" in row:
        return f"{row['peak_rss_mb']:.0f} (+{row['peak_rss_mb'] - row['base_rss_mb']:.0f})"
    return row.get("rss_error", "not measured")


def write_block(page: Path, text: str) -> None:
    """Rewrite the part of ``page`` between ``<!-- results: low_precision_speed -->`` and its end marker."""
    start, end = f"<!-- results: {BLOCK} -->\n", f"<!-- /results: {BLOCK} -->"
    body = page.read_text()
    if start not in body or end not in body:
        raise SystemExit(f"{page} has no results block ({start.strip()} ... {end})")
    head, rest = body.split(start, 1)
    page.write_text(head + start + text + end + rest.split(end, 1)[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="abc", help="any of step_time.py's layouts a, b, c")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--rounds", type=int, default=15, help="rounds taking turns")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--render", type=Path, help="print (or with --page write) the tables of a results file and exit")
    ap.add_argument("--page", type=Path, help="with --render: the page whose results block to rewrite")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--rss-child", nargs=2, metavar=("LAYOUT", "CONTENDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        torch.set_num_threads(args.threads)
        warnings.simplefilter("ignore")
        print(json.dumps(peak_rss_child(*args.rss_child, args.warmup)))
        return
    if args.render:
        table = render(json.loads(args.render.read_text()))
        if args.page is None:
            sys.stdout.write(table)
        else:
            write_block(args.page, table)
        return
    bad = set(args.layouts) - set(step_time.LAYOUTS)
    if bad or args.rounds < 1 or args.threads < 1:
        ap.error(f"layouts from {sorted(step_time.LAYOUTS)}, --rounds and --threads at least 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the peers' warnings would bury the tables
    results: dict = {}
    settings = {"layouts": args.layouts, "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
                "rss": not args.no_rss}
    for key in args.layouts:
        results[key] = run_layout(key, args.rounds, args.warmup, args.threads, rss=not args.no_rss)
        if args.json:
            results_file.write(args.json, "low_precision_speed", settings, results, threads=args.threads)
    if args.json:
        sys.stdout.write(render(results_file.load(args.json)))


if __name__ == "__main__":
    main()
