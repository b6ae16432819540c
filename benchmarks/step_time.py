"""Time of one optimiser step, per parameter layout: adoptim's kernels against torch and other ADOPT ports.

Prints one table per layout: (a) the GPT-2-small parameter list (124M parameters in 148 tensors),
(b) 10M parameters in 100 tensors, (c) 1000 tensors of 1000 elements. Columns: median ms per step,
first-step ms (state allocation and any compilation included), GB/s at 7 parameter-sized accesses per
element (28 bytes for float32), the fraction of the memory-bandwidth bound measured in the same run
(the median of its runs before and after the rows), and the ratio to torch's ``AdamW(fused=True)``.
Under each table: the time of allocating the state alone (two zero tensors per parameter, before and
after the rows), which every first step includes. The bound on the CPU is a STREAM-like kernel with the
step's access pattern (read p, g, m, v; write p, m, v) threaded as the fused kernel is; on CUDA it is the
device-to-device copy bandwidth.

    python benchmarks/step_time.py                      # all layouts, all rows that are installed
    python benchmarks/step_time.py --layouts a --exclude heavyball --json results.json

Rows of ports that are not installed are skipped (timm's ``Adopt`` is loaded from its module file when
``import timm`` fails, as it does without torchvision). With ``--json`` every finished row is saved at
once (written atomically, in the format of ``results_file.py``) and a rerun with the same file skips the
rows it already holds. Its ``results``: per ``"<layout>/<device>/<dtype>/<threads>"``, ``layout``
(title, tensors, numel, element_size), ``bound`` and ``alloc`` (``samples_ms``) and one entry per row
(``median_ms``, ``min_ms``, ``max_ms``, ``first_ms``, or ``error``); with ``--head-to-head``, per
``"head-to-head/<layout>/<device>/<dtype>/<threads>"``, ``layout``, ``rounds`` and ``times_ms`` (each
contender's time in every round, in round order).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import results_file
import torch

import adoptim

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


# ------------------------------------------------------------------ layouts

def gpt2_small_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> list[tuple]:
    """The parameter shapes of GPT-2 small (Hugging Face's layout, tied embeddings): 148 tensors."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


LAYOUTS: dict[str, tuple[str, Callable[[], list[tuple]]]] = {
    "a": ("GPT-2 small: 124M parameters in 148 tensors", gpt2_small_shapes),
    "b": ("10M parameters in 100 tensors", lambda: [(100_000,)] * 100),
    "c": ("1000 tensors of 1000 elements", lambda: [(1000,)] * 1000),
}


# ------------------------------------------------------------------ rows

def _timm_adopt() -> type | None:
    """timm's ``Adopt``: imported normally, or loaded from its file when ``import timm`` fails."""
    try:
        from timm.optim.adopt import Adopt

        return Adopt
    except Exception:  # noqa: BLE001 - timm imports torchvision, which may not load beside this torch
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    optim_dir = Path(list(spec.submodule_search_locations)[0]) / "optim"
    # A stand-in parent package lets adopt.py's relative imports (._helpers, ._types) resolve
    # without running timm/__init__.py.
    pkg = types.ModuleType("_timm_optim")
    pkg.__path__ = [str(optim_dir)]
    sys.modules.setdefault("_timm_optim", pkg)
    try:
        file_spec = importlib.util.spec_from_file_location("_timm_optim.adopt", optim_dir / "adopt.py")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules["_timm_optim.adopt"] = module
        file_spec.loader.exec_module(module)
        return module.Adopt
    except Exception:  # noqa: BLE001
        return None


def rows(device: str) -> list[tuple[str, Factory | None]]:
    """(name, factory) for every optimiser to time; factory is None when the package is missing."""
    out: list[tuple[str, Factory | None]] = [
        ("adoptim ADOPT for-loop", lambda p: adoptim.ADOPT(p, foreach=False)),
        ("adoptim ADOPT foreach", lambda p: adoptim.ADOPT(p, foreach=True)),
        ("adoptim ADOPT fused" + (" (C)" if device == "cpu" else " (Triton)"), lambda p: adoptim.ADOPT(p, fused=True)),
        ("adoptim ADOPT fused, flat", lambda p: adoptim.ADOPT(p, fused=True, flat=True)),
    ]
    kinds = (("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True)))
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        for label, kw in kinds:
            out.append((f"torch {cls.__name__} {label}", lambda p, cls=cls, kw=kw: cls(p, **kw)))
    try:
        from adopt import ADOPT as TorchAdopt

        out.append(("torch-adopt for-loop", lambda p: TorchAdopt(p, foreach=False)))
        out.append(("torch-adopt foreach", lambda p: TorchAdopt(p, foreach=True)))
    except ImportError:
        out.append(("torch-adopt", None))
    timm_adopt = _timm_adopt()
    out.append(("timm Adopt", (lambda p: timm_adopt(p)) if timm_adopt else None))
    try:
        from pytorch_optimizer import ADOPT as PoADOPT

        out.append(("pytorch_optimizer ADOPT", lambda p: PoADOPT(p)))
    except ImportError:
        out.append(("pytorch_optimizer ADOPT", None))
    try:
        import heavyball

        out.append(("heavyball ADOPT (compiled)", lambda p: heavyball.ADOPT(p, lr=1e-3)))
    except ImportError:
        out.append(("heavyball ADOPT", None))
    return out


# ------------------------------------------------------------------ timing

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    opt: torch.optim.Optimizer, set_grads: Callable[[], None], device: str, steps: int, warmup: int
) -> tuple[float, list[float]]:
    """First-step seconds, then ``steps`` timed steps after ``warmup`` untimed ones.

    ``set_grads`` runs untimed before every step: some optimisers (HeavyBall) clear the gradients.
    """
    set_grads()
    _sync(device)
    t0 = time.perf_counter()
    opt.step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        set_grads()
        opt.step()
    times = []
    for _ in range(steps):
        set_grads()
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, times


def bound_seconds(numel: int, dtype: torch.dtype, device: str, repeats: int) -> list[float]:
    """Seconds of ``repeats`` runs of the bandwidth-bound kernel for ``numel`` elements of ``dtype``."""
    nbytes = 7 * numel * torch.empty((), dtype=dtype).element_size()
    if device == "cpu":
        from adoptim.kernels.bandwidth import bandwidth_bound

        n32 = nbytes // 28  # float32 elements with the same traffic
        bufs = [torch.full((n32,), 0.5) for _ in range(4)]
        run = lambda: bandwidth_bound(*bufs)
    else:
        src = torch.ones(nbytes // 8, device=device)  # a copy moves 8 bytes per float32 element
        dst = torch.empty_like(src)
        run = lambda: dst.copy_(src)
    run()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ results file

def _load(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {**doc["results"], "settings": doc["settings"]} if "benchmark" in doc else doc


def _save(path: Path | None, results: dict) -> None:
    if path is None:
        return
    data = {k: v for k, v in results.items() if k != "settings"}
    results_file.write(path, "step_time", results.get("settings", {}), data, threads=torch.get_num_threads())


# ------------------------------------------------------------------ main

def run_layout(key: str, args: argparse.Namespace, results: dict) -> None:
    title, shapes_fn = LAYOUTS[key]
    shapes = shapes_fn()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    base = [(torch.randn(s, generator=gen) * 0.02).to(device=args.device, dtype=dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device=args.device, dtype=dtype) for s in shapes]
    numel = sum(p.numel() for p in base)
    nbytes = 7 * numel * base[0].element_size()
    store = results.setdefault(f"{key}/{args.device}/{args.dtype}/{args.threads}", {})

    def measure_bound() -> None:
        # Runs before and after the rows are pooled: on a shared machine the bandwidth on offer drifts
        # (both ways), and the median of both sets is what the rows in between could expect.
        samples = store.get("bound", {}).get("samples_ms", [])
        samples += [t * 1e3 for t in bound_seconds(numel, dtype, args.device, repeats=max(args.steps, 10))]
        median = statistics.median(samples)
        store["bound"] = {"median_ms": median, "gbps": nbytes / (median / 1e3) / 1e9, "samples_ms": samples}
        _save(args.json, results)

    def measure_alloc() -> None:
        # What every optimiser here does first in its first step: two zero tensors per parameter. Fresh
        # memory must be zeroed by the operating system page by page, which no kernel can avoid.
        samples = store.get("alloc", {}).get("samples_ms", [])
        for _ in range(3):
            gc.collect()
            _sync(args.device)
            t0 = time.perf_counter()
            state = [torch.zeros_like(b) for b in base for _ in range(2)]
            _sync(args.device)
            samples.append((time.perf_counter() - t0) * 1e3)
            del state
        store["alloc"] = {"median_ms": statistics.median(samples), "samples_ms": samples}
        _save(args.json, results)

    if "bound" not in store:
        measure_bound()
    if "alloc" not in store:
        measure_alloc()
    todo = [(n, f) for n, f in rows(args.device) if re.search(args.rows, n) and not re.search(args.exclude, n)]
    for i, (name, factory) in enumerate(todo):
        if name in store or factory is None:
            continue
        print(f"[{key}] {i + 1}/{len(todo)} {name}", file=sys.stderr, flush=True)
        params = [torch.nn.Parameter(b.clone()) for b in base]

        def set_grads(params: list[torch.nn.Parameter] = params) -> None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g

        gc.collect()  # else a full collection of the imported ports' objects may land in a first step
        try:
            opt = factory(params)
            first, times = time_steps(opt, set_grads, args.device, args.steps, args.warmup)
            store[name] = {
                "median_ms": statistics.median(times) * 1e3, "first_ms": first * 1e3,
                "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
            }
        except Exception as exc:  # noqa: BLE001 - a port failing here is reported, not fatal
            store[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        del params
        opt = None
        gc.collect()
        _save(args.json, results)

    if len(store["bound"]["samples_ms"]) <= max(args.steps, 10):
        measure_bound()  # again after the rows
        measure_alloc()
    print(f"\n### ({key}) {title}: {numel / 1e6:.1f}M parameters, {args.dtype}, {args.device}, "
          f"{args.threads} thread(s), median of {args.steps} steps\n")
    ref = store.get("torch AdamW fused", {}).get("median_ms")
    bound = store["bound"]
    print("| optimizer | median ms | min ms | first-step ms | GB/s | of bound | vs AdamW fused |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| bound (STREAM-like, same traffic) | {bound['median_ms']:.1f} | {min(bound['samples_ms']):.1f} | | "
          f"{bound['gbps']:.1f} | 1.00 | |")
    for name, factory in todo:
        row = store.get(name)
        if factory is None:
            print(f"| {name} | not installed | | | | | |")
            continue
        if row is None:
            continue
        if "error" in row:
            print(f"| {name} | failed: {row['error']} | | | | | |")
            continue
        gbps = nbytes / (row["median_ms"] / 1e3) / 1e9
        ratio = f"{row['median_ms'] / ref:.2f}" if ref else "n/a"
        print(f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['first_ms']:.1f} | {gbps:.1f} | "
              f"{gbps / bound['gbps']:.2f} | {ratio} |")
    alloc = store["alloc"]["samples_ms"]
    print(f"\nAllocating the state alone (two zero tensors per parameter, the first thing every first step "
          f"above does): median {statistics.median(alloc):.1f} ms, {min(alloc):.1f} to {max(alloc):.1f} ms")
    spreads = [(r["max_ms"] - r["min_ms"]) / r["median_ms"] for r in store.values() if "min_ms" in r]
    if spreads:
        print(f"\n(max - min) / median over the timed steps: median {statistics.median(spreads):.0%}, "
              f"worst {max(spreads):.0%}; load average {os.getloadavg()[0]:.1f}")


def head_to_head(key: str, args: argparse.Namespace) -> dict:
    """The bound, adoptim's fused step (default and flat layout) and torch's fused AdamW, taking turns.

    The bandwidth a shared machine offers drifts by tens of percent within a minute, so rows timed one
    after another can disagree by more than the difference between them; taking turns puts all four
    under the same conditions, and the per-round ratios show the spread.
    """
    title, shapes_fn = LAYOUTS[key]
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shapes = shapes_fn()
    base = [(torch.randn(s, generator=gen) * 0.02).to(device=args.device, dtype=dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device=args.device, dtype=dtype) for s in shapes]
    numel = sum(b.numel() for b in base)
    nbytes = 7 * numel * base[0].element_size()
    contenders = {"adoptim ADOPT fused": lambda p: adoptim.ADOPT(p, fused=True),
                  "adoptim ADOPT fused, flat": lambda p: adoptim.ADOPT(p, fused=True, flat=True),
                  "torch AdamW fused": lambda p: torch.optim.AdamW(p, fused=True)}
    steps = {}
    for name, factory in contenders.items():
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt = factory(params)
        for _ in range(1 + args.warmup):
            opt.step()
        steps[name] = opt.step
    if args.device == "cpu":
        from adoptim.kernels.bandwidth import bandwidth_bound

        bufs = [torch.full((nbytes // 28,), 0.5) for _ in range(4)]
        steps["bound"] = lambda: bandwidth_bound(*bufs)
    else:
        src = torch.ones(nbytes // 8, device=args.device)
        dst = torch.empty_like(src)
        steps["bound"] = lambda: dst.copy_(src)
    steps["bound"]()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # each goes first, second, ... in turn
            _sync(args.device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(args.device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    def per_round(num: str, den: str) -> list[float]:
        return [a / b for a, b in zip(times[num], times[den], strict=True)]
    print(f"\n### ({key}) head to head, taking turns: {title}, {numel / 1e6:.1f}M parameters, {args.dtype}, "
          f"{args.device}, {args.threads} thread(s), {args.rounds} rounds\n")
    print("| what | median ms | min ms | GB/s |")
    print("|---|---:|---:|---:|")
    for name in ["bound", *contenders]:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.1f} | {min(times[name]):.1f} | {nbytes / (med / 1e3) / 1e9:.1f} |")
    print()
    for name in [n for n in contenders if n.startswith("adoptim")]:
        ratios, of_bound = per_round(name, "torch AdamW fused"), per_round(name, "bound")
        q = statistics.quantiles(ratios, n=4)
        print(f"{name} / AdamW fused, per round: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f} "
              f"to {q[2]:.3f}); {name} / bound, per round: median {statistics.median(of_bound):.2f}")
    print(f"load average {os.getloadavg()[0]:.1f}")
    layout = {"title": title, "tensors": len(shapes), "numel": numel, "element_size": base[0].element_size()}
    return {"layout": layout, "rounds": args.rounds, "times_ms": times}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layouts", default="abc", help="any of a, b, c")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", default=".", help="regex: time only rows whose name matches")
    parser.add_argument("--exclude", default="^$", help="regex: skip rows whose name matches")
    parser.add_argument("--json", type=Path, default=None, help="save results here; rerun to resume")
    parser.add_argument("--head-to-head", action="store_true",
                        help="only the bound, adoptim fused and torch AdamW fused, taking turns every round")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of --head-to-head")
    args = parser.parse_args(argv)
    bad = set(args.layouts) - set(LAYOUTS)
    if bad:
        parser.error(f"unknown layout(s) {sorted(bad)}: choose from {sorted(LAYOUTS)}")
    if args.steps < 1 or args.threads < 1 or args.rounds < 4:
        parser.error("--steps and --threads must be at least 1, --rounds at least 4")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # other ports' deprecation warnings would bury the tables
    results = _load(args.json)
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"torch {torch.__version__}, adoptim {adoptim.__version__}, {args.device}, "
          f"load average at start {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for key in args.layouts:
        store = f"{key}/{args.device}/{args.dtype}/{args.threads}"
        if args.head_to_head:
            results["head-to-head/" + store] = head_to_head(key, args)
        else:
            run_layout(key, args, results)
            shapes = LAYOUTS[key][1]()
            results[store]["layout"] = {
                "title": LAYOUTS[key][0], "tensors": len(shapes), "numel": sum(math.prod(s) for s in shapes),
                "element_size": torch.empty((), dtype=getattr(torch, args.dtype)).element_size()}
        _save(args.json, results)


if __name__ == "__main__":
    main()
