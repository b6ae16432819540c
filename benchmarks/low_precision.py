"""Which storage of ADOPT's moments trains like 32-bit state: the measurement behind ``state_precision``.

Claim: with ADOPT's default betas (0.9, 0.9999), nearest rounding of ``v`` to 8-bit codes or to bfloat16
leaves ``v`` where it was (it moves by about 1e-4 of itself per step, less than half a gap), while
stochastic rounding keeps it on the 32-bit trajectory, and the run trains as 32-bit ADOPT does.

The task is the suite's MNIST experiment (the paper's MLP, real MNIST, weight decay 1e-4, lr 1e-3/sqrt(t),
batches as ``adoptim_repro.mnist_data`` draws them), shortened to ``--steps``, over ``--seeds`` seeds, one
torch thread. Every candidate steps the same batches from the same initial weights; tensors under 4096
elements (the biases) keep 32-bit state in all of them. Besides the final training loss and test
accuracy, it reports how far the stored ``v`` of the first layer is from a float32 ``v`` fed the same
gradients (the median relative error over its elements): the direct sign of a frozen ``v``.

    # one process per seed (each one torch thread), then the table of docs/low_precision.md:
    python benchmarks/low_precision.py --steps 1000 --seed0 0 --seeds 1 \
        --json benchmarks/results/low_precision/seeds_a.json
    python benchmarks/low_precision.py --render benchmarks/results/low_precision/*.json --page docs/low_precision.md

``--page`` rewrites the part of the page between ``<!-- results: low_precision -->`` and
``<!-- /results: low_precision -->``; the rest of the page is hand-written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from adoptim import ADOPT
from adoptim.kernels.contract import Hyper
from adoptim.kernels.lowbit import MomentFormat as M
from adoptim.kernels.lowbit import StateFormat, Stored, lowbit_adopt

BLOCK, MIN_SIZE = 256, 4096
F32 = M("float32")
# name -> (storage of m and v, why it is a candidate)
CANDIDATES: dict[str, tuple[StateFormat | None, str]] = {
    "32-bit": (None, "adoptim.ADOPT, float32 state (the baseline)"),
    "bf16 nearest": (StateFormat(M("bfloat16"), M("bfloat16")), "bfloat16, round to nearest"),
    "bf16 stochastic": (StateFormat(M("bfloat16", True), M("bfloat16", True)), "bfloat16, stochastic rounding"),
    "8bit nearest": (StateFormat(M("8bit"), M("8bit")), "8-bit blockwise, nearest (bitsandbytes' rounding)"),
    "8bit sqrt(v) nearest": (StateFormat(M("8bit"), M("8bit", sqrt=True)), "8-bit, v stored as sqrt(v), nearest"),
    "8bit v stochastic": (StateFormat(M("8bit"), M("8bit", True)), "8-bit, stochastic rounding of v only"),
    "8bit stochastic": (StateFormat(M("8bit", True), M("8bit", True)), "8-bit, stochastic rounding of m and v"),
    "8bit sqrt(v) stochastic": (StateFormat(M("8bit", True), M("8bit", True, sqrt=True)),
                                "8-bit, sqrt(v) stored, stochastic rounding"),
    "8bit m, bf16 v nearest": (StateFormat(M("8bit"), M("bfloat16")), "v wider than m: 8-bit m, bfloat16 v"),
    "8bit m, fp32 v": (StateFormat(M("8bit"), F32), "v wider than m: 8-bit m, float32 v (5 bytes/param)"),
}


def train(name: str, steps: int, seed: int, hidden: int = 784) -> dict[str, float]:
    from adoptim_repro.mnist_data import batch_indices, load_mnist

    data = load_mnist(None)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    params = list(model.parameters())
    fmt = CANDIDATES[name][0]
    lr0, wd, betas, eps = 1e-3, 1e-4, (0.9, 0.9999), 1e-6
    opt = ADOPT(params, lr=lr0, betas=betas, eps=eps, weight_decay=wd, foreach=False, fused=False)
    if fmt is not None:
        moments = []
        for i, p in enumerate(params):
            f = fmt if p.numel() >= MIN_SIZE else StateFormat(F32, F32)
            kw = dict(block_size=BLOCK, seed=i, device=p.device)
            moments.append((Stored.empty(p.numel(), f.m, signed=True, stream=0, **kw),
                            Stored.empty(p.numel(), f.v, signed=False, stream=1, **kw)))
        steps_t = [torch.zeros(()) for _ in params]
    shadow = torch.zeros(params[0].numel())
    window: list[float] = []
    for step in range(steps):
        idx = batch_indices(len(data.train_x), 128, seed, step)
        loss = nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        model.zero_grad(set_to_none=True)
        loss.backward()
        lr = lr0 / math.sqrt(step + 1)
        g0 = (params[0].grad + wd * params[0].detach()).reshape(-1)
        shadow = g0 * g0 if step == 0 else shadow * betas[1] + (1 - betas[1]) * g0 * g0
        if fmt is None:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        else:
            hyper = Hyper(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd,
                          decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
            with torch.no_grad():
                lowbit_adopt(params, [p.grad for p in params], [m for m, _ in moments],
                             [v for _, v in moments], steps_t, hyper)
        window = (window + [loss.item()])[-100:]
    v = opt.state[params[0]]["exp_avg_sq"].reshape(-1) if fmt is None else moments[0][1].load()
    live = shadow > 0
    rel = ((v[live] - shadow[live]).abs() / shadow[live]).median().item()
    with torch.no_grad():
        acc = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    return {"train_loss": sum(window) / len(window), "test_accuracy": 100 * acc, "v_rel_err": rel}


def _ci95(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57}.get(len(xs), 2.45)
    return t * statistics.stdev(xs) / math.sqrt(len(xs))


def render(paths: list[Path]) -> str:
    """The Markdown table of the runs in ``paths`` (the same steps; seeds may be split over files)."""
    results = [json.loads(p.read_text()) for p in paths]
    runs = [r for res in results for r in res["runs"]]
    meta = results[0]["meta"]
    if any(res["meta"]["steps"] != meta["steps"] for res in results):
        raise SystemExit("the files hold runs of different lengths")
    meta["seeds"] = len({r["seed"] for r in runs})
    base = {r["seed"]: r for r in runs if r["candidate"] == "32-bit"}
    lines = [
        f"MNIST MLP ({meta['steps']} steps, {meta['seeds']} seeds, one torch thread, torch {meta['torch']}); "
        "mean ± 95% interval over seeds; the paired difference is the candidate minus 32-bit on the same seed.",
        "",
        "| candidate | bytes of state / param | train loss | Δ loss vs 32-bit (paired) | test acc. % "
        "| Δ acc. (paired) | median rel. error of v |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in meta["candidates"]:
        rs = [r for r in runs if r["candidate"] == name]
        if not rs:
            continue
        loss = [r["train_loss"] for r in rs]
        acc = [r["test_accuracy"] for r in rs]
        dl = [r["train_loss"] - base[r["seed"]]["train_loss"] for r in rs if r["seed"] in base]
        da = [r["test_accuracy"] - base[r["seed"]]["test_accuracy"] for r in rs if r["seed"] in base]
        err = statistics.mean(r["v_rel_err"] for r in rs)
        nbytes = _bytes(CANDIDATES[name][0])
        lines.append(
            f"| {name} | {nbytes:.2f} | {statistics.mean(loss):.4f} ± {_ci95(loss):.4f} "
            f"| {statistics.mean(dl):+.4f} ± {_ci95(dl):.4f} | {statistics.mean(acc):.2f} ± {_ci95(acc):.2f} "
            f"| {statistics.mean(da):+.2f} ± {_ci95(da):.2f} | {err:.2e} |"
        )
    return "\n".join(lines) + "\n"


def _bytes(fmt: StateFormat | None) -> float:
    """Bytes of m and v per quantized parameter element (8-bit codes count their block scales)."""
    if fmt is None:
        return 8.0
    size = {"8bit": 1 + 4 / BLOCK, "bfloat16": 2.0, "float32": 4.0}
    return size[fmt.m.kind] + size[fmt.v.kind]


def speed(tensors: int = 10, size: int = 100_000, repeats: int = 5) -> list[dict[str, float | str]]:
    """Step time (ms, median of ``repeats`` after two warm-up steps) and bytes of state per parameter
    (counted from the state tensors) of ``tensors`` float32 tensors of ``size`` elements, one thread."""
    from adoptim.kernels import lowbit_cpu

    rows = []
    for name, kw in (("full, fused C", {}), ("bfloat16, torch", {"state_precision": "bfloat16"}),
                     ("8bit, torch", {"state_precision": "8bit", "fused": False}),
                     ("8bit, fused C", {"state_precision": "8bit"})):
        if name == "8bit, fused C" and not lowbit_cpu.available():
            continue
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(size, generator=gen).requires_grad_() for _ in range(tensors)]
        opt = ADOPT(params, **kw)
        times = []
        for i in range(repeats + 2):
            for p in params:
                p.grad = torch.randn(size, generator=gen)
            t0 = time.perf_counter()
            opt.step()
            if i >= 2:
                times.append(1e3 * (time.perf_counter() - t0))
        nbytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                     for k, t in st.items() if k.startswith("exp_avg"))
        rows.append({"name": name, "ms": statistics.median(times), "bytes": nbytes / (tensors * size)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps per run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds SEED0..SEED0+N-1")
    ap.add_argument("--seed0", type=int, default=0, help="the first seed (to split the seeds over processes)")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="names, as in CANDIDATES")
    ap.add_argument("--json", type=Path, help="write (and resume) the runs here")
    ap.add_argument("--render", type=Path, nargs="+", help="print the Markdown table of JSON files and exit")
    ap.add_argument("--page", type=Path, help="with --render: write the table into this page's results block")
    ap.add_argument("--speed", action="store_true", help="print step times and bytes of state per parameter")
    ap.add_argument("--library", help="with --speed: a fused CPU library built from this checkout (when the "
                    "installed one predates the fused 8-bit step)")
    args = ap.parse_args()
    if args.render:
        table = render(args.render)
        if args.page is None:
            sys.stdout.write(table)
            return
        page = args.page.read_text()
        start, end = "<!-- results: low_precision -->\n", "<!-- /results: low_precision -->"
        if start not in page or end not in page:
            raise SystemExit(f"{args.page} has no results block ({start.strip()} ... {end})")
        head, rest = page.split(start, 1)
        args.page.write_text(head + start + table + end + rest.split(end, 1)[1])
        return
    torch.set_num_threads(1)
    if args.speed:
        if args.library:
            from adoptim.kernels import lowbit_cpu

            lib = lowbit_cpu.load(args.library)
            if lib is None:
                raise SystemExit(f"{args.library} has no adopt_lowbit8_step")
            lowbit_cpu._installed = lambda: lib  # this run's library, in place of the installed one
        print(f"10 float32 tensors of 100,000 elements, one thread, torch {torch.__version__}\n")
        print("| state | step (ms) | bytes of state / param |\n|---|---:|---:|")
        for row in speed():
            print(f"| {row['name']} | {row['ms']:.1f} | {row['bytes']:.3f} |")
        return
    out = {"meta": {"steps": args.steps, "seeds": args.seeds, "seed0": args.seed0, "candidates": args.candidates,
                    "torch": torch.__version__}, "runs": []}
    if args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        if old["meta"]["steps"] == args.steps:
            out["runs"] = old["runs"]
    done = {(r["candidate"], r["seed"]) for r in out["runs"]}
    for seed in range(args.seed0, args.seed0 + args.seeds):
        for name in args.candidates:
            if (name, seed) in done:
                continue
            t0 = time.perf_counter()
            r = train(name, args.steps, seed)
            out["runs"].append({"candidate": name, "seed": seed, **r, "seconds": time.perf_counter() - t0})
            print(f"{name:26s} seed {seed}: loss {r['train_loss']:.4f} acc {r['test_accuracy']:.2f} "
                  f"v err {r['v_rel_err']:.2e} ({time.perf_counter() - t0:.0f}s)", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
