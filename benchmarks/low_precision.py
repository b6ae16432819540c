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

``--task vae`` (and ``--task gpt``) trains the suite's own experiment instead (``adoptim_repro.vae.run``,
unchanged, with its default config but ``--steps``), once with each of ``adopt``, ``adopt-bf16`` and
``adopt-8bit``: the options as they ship (``ADOPT(state_precision=...)``), paired by seed (the experiment
seeds the initial weights, the batches and the noise by it). Its runs go to their own JSON files and
their own results block::

    python benchmarks/low_precision.py --task vae --steps 1000 --seed0 0 --seeds 5 \
        --json benchmarks/results/low_precision/vae.json
    python benchmarks/low_precision.py --render benchmarks/results/low_precision/vae.json --page docs/low_precision.md

``--task llama`` does the same with the llama finetune (``--steps`` finetuning steps): each seed is
pretrained once, with AdamW as the experiment does, and its three finetunes start from those weights::

    python benchmarks/low_precision.py --task llama --steps 300 --seed0 0 --seeds 4 \
        --json benchmarks/results/low_precision/llama_s0.json
    python benchmarks/low_precision.py --render benchmarks/results/low_precision/llama_s*.json \
        --page docs/low_precision.md

``--task gpt-bf16`` trains the gpt experiment the same way with its model in pure bfloat16 (parameters and
state, no float32 master weights; the run's own code, with the model cast to bfloat16 after it is built and
the optimizer built with the candidate's options in place of the suite's ``adopt``): today's plain bfloat16
step, the bfloat16 update rounded to nearest, stochastically, or Kahan-compensated (``param_rounding``),
against the same run with float32 parameters::

    python benchmarks/low_precision.py --task gpt-bf16 --steps 200 --batch 16 --seed0 0 --seeds 5 \
        --json benchmarks/results/low_precision/gpt_bf16.json
    python benchmarks/low_precision.py --render benchmarks/results/low_precision/gpt_bf16.json \
        --page docs/low_precision.md

A run is appended to ``--json`` as soon as it ends (the file replaced atomically), and a rerun with the
same file skips the runs it holds: an interrupted measurement resumes where it stopped. ``--page``
rewrites the part of the page between ``<!-- results: low_precision -->`` and
``<!-- /results: low_precision -->`` (``<!-- results: low_precision TASK -->`` for another task); the rest
of the page is hand-written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# The suite's experiments run with the shipped options: candidate -> the suite's optimizer name.
SUITE_CANDIDATES = {"32-bit": "adopt", "bf16 stochastic": "adopt-bf16", "8bit stochastic": "adopt-8bit"}


# The gpt experiment in pure bfloat16: candidate -> (the parameters' dtype, ADOPT's options, bytes per parameter
# element of weights and state). Every bfloat16 candidate but the plain one stores the moments as
# state_precision="bfloat16" (stochastic rounding, which the measurements above chose), so the runs differ in
# how the parameter takes its update. (Mixed precision with float32 master weights and bfloat16 state would be
# 4 + 2 + 4 = 10 bytes.)
BF16_PARAM_CANDIDATES: dict[str, tuple[torch.dtype, dict[str, str], float]] = {
    "32-bit": (torch.float32, {}, 12.0),
    "bf16 plain": (torch.bfloat16, {}, 6.0),
    "bf16 nearest": (torch.bfloat16, {"state_precision": "bfloat16"}, 6.0),
    "bf16 stochastic": (torch.bfloat16, {"state_precision": "bfloat16", "param_rounding": "stochastic"}, 6.0),
    "bf16 kahan": (torch.bfloat16, {"state_precision": "bfloat16", "param_rounding": "kahan"}, 8.0),
}


class Task:
    """A measured task: its candidates, the metrics of its table (key, heading, heading of the paired
    difference, digits), the table's title, and the bytes column (heading, bytes per candidate; by default
    the state of the candidate's format)."""

    def __init__(self, candidates: list[str], metrics: list[tuple[str, str, str, int]], title: str,
                 bytes_head: str = "bytes of state / param", bytes_of: dict[str, float] | None = None) -> None:
        self.candidates, self.metrics, self.title = candidates, metrics, title
        self.bytes_head, self.bytes_of = bytes_head, bytes_of


TASKS = {
    "mnist": Task(list(CANDIDATES), [("train_loss", "train loss", "Δ loss vs 32-bit", 4),
                                              ("test_accuracy", "test acc. %", "Δ acc.", 2)],
                  "MNIST MLP ({steps} steps, {seeds} seeds, one torch thread, torch {torch})"),
    "vae": Task(list(SUITE_CANDIDATES), [("test_nelbo", "test -ELBO (nats)", "Δ test vs 32-bit", 3),
                                         ("train_nelbo_final", "train -ELBO (nats)", "Δ train", 3)],
                "The suite's vae experiment (conv VAE on binarised MNIST, batch 128, constant lr 1e-3, betas "
                "(0.9, 0.9999), eps 1e-6), {steps} steps, {seeds} seeds, one torch thread, torch {torch}"),
    "gpt": Task(list(SUITE_CANDIDATES), [("val_loss", "held-out loss (nats/byte)", "Δ held-out vs 32-bit", 4),
                                         ("final_train_loss", "train loss (nats/byte)", "Δ train", 4)],
                "The suite's gpt experiment (byte-level GPT on Shakespeare, batch {batch}, lr 2e-3 with {warmup} "
                "warm-up steps and a cosine decay, no weight decay, betas (0.9, 0.9999)), {steps} steps, {seeds} "
                "seeds, one torch thread, torch {torch}"),
    "gpt-bf16": Task(list(BF16_PARAM_CANDIDATES),
                     [("val_loss", "held-out loss (nats/byte)", "Δ held-out vs 32-bit", 4),
                      ("final_train_loss", "train loss (nats/byte)", "Δ train", 4)],
                     "The suite's gpt experiment in pure bfloat16 (no float32 master weights) against float32 "
                     "parameters (byte-level GPT on Shakespeare, batch {batch}, lr 2e-3 with {warmup} warm-up "
                     "steps and a cosine decay, no weight decay, betas (0.9, 0.9999)), {steps} steps, {seeds} "
                     "seeds, one torch thread, torch {torch}",
                     "bytes of weights + state / param", {k: v[2] for k, v in BF16_PARAM_CANDIDATES.items()}),
    "llama": Task(list(SUITE_CANDIDATES),
                  [("heldout_loss", "held-out response loss (nats/byte)", "Δ held-out vs 32-bit", 4),
                   ("final_train_loss", "train loss (nats/byte)", "Δ train", 4),
                   ("shakespeare_val_loss", "Shakespeare held-out loss", "Δ Shakespeare", 4)],
                  "The suite's llama finetune (a 0.67M-parameter LlamaForCausalLM pretrained on Shakespeare with "
                  "AdamW, once per seed, then finetuned on King James Bible records, batch 8, lr 1e-3 with 3% "
                  "warm-up and a cosine decay, clipping 1.0, betas (0.9, 0.9999)), {steps} finetuning steps, "
                  "{seeds} seeds, one torch thread, torch {torch}"),
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


def _stored_v(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """``p``'s v as float32, whatever format the optimizer stores it in."""
    from adoptim.kernels.quant import dequantize_8bit

    state = opt.state[p]
    v = state["exp_avg_sq"]
    if v.dtype == torch.uint8:
        block = next(g["state_block_size"] for g in opt.param_groups if any(q is p for q in g["params"]))
        return dequantize_8bit(v, state["exp_avg_sq_absmax"], signed=False, block_size=block)
    return v.float().reshape(-1)


def gpt_warmup(steps: int) -> int:
    """gpt's warm-up at ``steps``: its default (100 of 1000 steps) scaled to the run."""
    return max(1, steps // 10)


def train_suite(task: str, name: str, steps: int, seed: int, batch: int = 16) -> dict[str, float]:
    """One run of the suite's experiment ``task`` as ``adoptim <task>`` runs it, with ``--steps``, and the
    median relative error of the stored v of its largest parameter against a float32 v of its gradients."""
    from adoptim_repro.distributed import Dist
    from adoptim_repro.runner import RunContext, Unit

    experiment = "gpt" if task == "gpt-bf16" else task
    module = importlib.import_module(f"adoptim_repro.{experiment}")
    optimizer = "adopt" if task == "gpt-bf16" else SUITE_CANDIDATES[name]
    cfg = module.EXPERIMENT.config(steps=steps, seeds=1, optimizers=(optimizer,))
    if getattr(cfg, "ensemble", False):
        cfg.ensemble = False  # one model per run: the seed's own, whose optimizer the v follower below hooks
    if experiment == "gpt":
        cfg.batch_sizes, cfg.warmup = (batch,), gpt_warmup(steps)
    cfg.validate()
    setting = {"gpt": (("batch", batch),), "llama": (("stage", "finetune"),)}.get(experiment, ())
    unit = Unit(optimizer, seed, setting)
    # llama finetunes the seed's pretrained weights: pretrained once per seed and process (before the hook
    # below, which follows the finetune's optimizer), in a folder kept while the process runs.
    out_dir = _llama_pretrained(module, cfg, seed) if experiment == "llama" else None
    tracked: dict[str, Any] = {}

    def follow_v(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A float32 v fed the same gradients, as ADOPT's rule writes it (v_0 = g^2, then the average).
        if "p" not in tracked:
            group = max(opt.param_groups, key=lambda g: max(q.numel() for q in g["params"]))
            tracked.update(opt=opt, p=max(group["params"], key=lambda q: q.numel()), group=group)
        p, group = tracked["p"], tracked["group"]
        g = p.grad.detach().reshape(-1).float()
        if group["weight_decay"] and not group["decoupled_weight_decay"]:
            g = g + group["weight_decay"] * p.detach().reshape(-1).float()
        beta2 = group["betas"][1]
        tracked["v"] = g * g if "v" not in tracked else tracked["v"] * beta2 + (1 - beta2) * g * g

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(follow_v)
    try:
        with contextlib.nullcontext(out_dir) if out_dir else tempfile.TemporaryDirectory() as out:
            ctx = RunContext(Path(out), unit, Dist(), checkpoint_every=math.inf, say=lambda line: None)
            try:
                with _bf16_model(module, name) if task == "gpt-bf16" else contextlib.nullcontext():
                    result = module.run(cfg, unit, ctx)
            finally:
                ctx.close()
    finally:
        hook.remove()
    v, shadow = _stored_v(tracked["opt"], tracked["p"]), tracked["v"]
    live = shadow > 0
    rel = ((v[live] - shadow[live]).abs() / shadow[live]).median().item()
    metrics = {key: float(result[key]) for key, *_ in TASKS[task].metrics}
    return {**metrics, "v_rel_err": rel}


_PRETRAINED: dict[tuple[int, int], str] = {}  # (seed, pretraining steps) -> the folder holding its weights
_KEEP: list[tempfile.TemporaryDirectory] = []  # the folders, removed when the process ends


def _llama_pretrained(module: Any, cfg: Any, seed: int) -> str:
    """A folder in which the llama experiment finds seed ``seed``'s pretrained weights (pretrained here, with
    the experiment's own pretraining unit, the first time a seed is asked for)."""
    from adoptim_repro.distributed import Dist
    from adoptim_repro.runner import RunContext, Unit

    key = (seed, cfg.pretrain_steps)
    if key not in _PRETRAINED:
        _KEEP.append(tempfile.TemporaryDirectory(prefix=f"llama-pretrained-s{seed}-"))
        out = _KEEP[-1].name
        unit = Unit("adamw", seed, (("stage", "pretrain"),))
        ctx = RunContext(Path(out), unit, Dist(), checkpoint_every=math.inf, say=lambda line: None)
        try:
            module.run(cfg, unit, ctx)
        finally:
            ctx.close()
        _PRETRAINED[key] = out
    return _PRETRAINED[key]


@contextlib.contextmanager
def _bf16_model(module: Any, name: str) -> Iterator[None]:
    """While it is open, ``module.run`` builds its model in candidate ``name``'s dtype and its optimizer as the
    suite's ``adopt`` (the same lr, betas, eps and decay) with the candidate's options."""
    dtype, options, _ = BF16_PARAM_CANDIDATES[name]
    build, make = module.build_model, module.make_optimizer

    def build_model(cfg: Any, vocab: int) -> nn.Module:
        return build(cfg, vocab).to(dtype)

    def make_optimizer(opt_name: str, params: Any, spec: Any) -> torch.optim.Optimizer:
        assert opt_name == "adopt", opt_name
        return ADOPT(params, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay,
                     **options)

    module.build_model, module.make_optimizer = build_model, make_optimizer
    try:
        yield
    finally:
        module.build_model, module.make_optimizer = build, make


def _ci95(xs: list[float]) -> float:
    """The half-width of the 95% t-interval of the mean of ``xs`` (the suite's t quantiles)."""
    from adoptim_repro.report import t975

    if len(xs) < 2:
        return float("nan")
    return t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def render(paths: list[Path]) -> tuple[str, str]:
    """The task and the Markdown table of the runs in ``paths`` (one task, the same steps; seeds may be
    split over files)."""
    results = [json.loads(p.read_text()) for p in paths]
    runs = [r for res in results for r in res["runs"]]
    meta = results[0]["meta"]
    task = meta.get("task", "mnist")
    if any(res["meta"].get("task", "mnist") != task for res in results):
        raise SystemExit("the files hold runs of different tasks: render each task on its own")
    if any(res["meta"]["steps"] != meta["steps"] for res in results):
        raise SystemExit("the files hold runs of different lengths")
    meta["seeds"] = len({r["seed"] for r in runs})
    spec = TASKS[task]
    base = {r["seed"]: r for r in runs if r["candidate"] == "32-bit"}
    heads = "".join(f" | {label} | {delta} (paired)" for _, label, delta, _ in spec.metrics)
    lines = [
        spec.title.format(**meta) + "; mean ± 95% interval over seeds; the paired difference is the candidate "
        "minus 32-bit on the same seed.",
        "",
        f"| candidate | {spec.bytes_head}{heads} | median rel. error of v |",
        "|---|---|" + "---|---|" * len(spec.metrics) + "---|",
    ]
    for name in meta["candidates"]:
        rs = [r for r in runs if r["candidate"] == name]
        if not rs:
            continue
        size = spec.bytes_of[name] if spec.bytes_of is not None else _bytes(CANDIDATES[name][0])
        cells = [name, f"{size:.2f}"]
        for key, _, _, digits in spec.metrics:
            xs = [r[key] for r in rs]
            ds = [r[key] - base[r["seed"]][key] for r in rs if r["seed"] in base]
            cells += [f"{statistics.mean(xs):.{digits}f} ± {_ci95(xs):.{digits}f}",
                      f"{statistics.mean(ds):+.{digits}f} ± {_ci95(ds):.{digits}f}" if ds else "n/a"]
        cells.append(f"{statistics.mean(r['v_rel_err'] for r in rs):.2e}")
        lines.append("| " + " | ".join(cells) + " |")
    return task, "\n".join(lines) + "\n"


# The length of each task's main table on the page; runs of another length have a block of their own.
MAIN_STEPS = {"mnist": 1000, "vae": 1500, "gpt": 200, "gpt-bf16": 200, "llama": 300}


def block_marks(task: str, steps: int | None = None) -> tuple[str, str]:
    """The lines that open and close the results block in a page of ``task``'s runs of ``steps`` steps (default
    the main table's length)."""
    name = "low_precision" if task == "mnist" else f"low_precision {task}"
    if steps is not None and steps != MAIN_STEPS[task]:
        name += f" {steps} steps"
    return f"<!-- results: {name} -->\n", f"<!-- /results: {name} -->"


def write_json(path: Path, out: dict[str, Any]) -> None:
    """Replace ``path`` with ``out`` atomically: a reader (or a resumed run) sees the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(out, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _bytes(fmt: StateFormat | None) -> float:
    """Bytes of m and v per quantized parameter element (8-bit codes count their block scales)."""
    if fmt is None:
        return 8.0
    size = {"8bit": 1 + 4 / BLOCK, "bfloat16": 2.0, "float32": 4.0}
    return size[fmt.m.kind] + size[fmt.v.kind]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=list(TASKS), default="mnist",
                    help="mnist: the candidates on the MNIST MLP; vae, gpt, llama: the suite's experiment with "
                         "each shipped option; gpt-bf16: gpt in pure bfloat16 with each param_rounding")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds SEED0..SEED0+N-1")
    ap.add_argument("--seed0", type=int, default=0, help="the first seed (to split the seeds over processes)")
    ap.add_argument("--candidates", nargs="*", default=None,
                    help="names, as in CANDIDATES (mnist), SUITE_CANDIDATES (vae, gpt, llama) or BF16_PARAM_CANDIDATES "
                         "(gpt-bf16); default all of them")
    ap.add_argument("--batch", type=int, default=16, help="gpt: sequences per step")
    ap.add_argument("--json", type=Path, help="write (and resume) the runs here")
    ap.add_argument("--render", type=Path, nargs="+", help="print the Markdown table of JSON files and exit")
    ap.add_argument("--page", type=Path, help="with --render: write the table into this page's results block")
    args = ap.parse_args()
    if args.render:
        task, table = render(args.render)
        if args.page is None:
            sys.stdout.write(table)
            return
        page = args.page.read_text()
        start, end = block_marks(task, json.loads(args.render[0].read_text())["meta"]["steps"])
        if start not in page or end not in page:
            raise SystemExit(f"{args.page} has no results block ({start.strip()} ... {end})")
        head, rest = page.split(start, 1)
        args.page.write_text(head + start + table + end + rest.split(end, 1)[1])
        return
    torch.set_num_threads(1)
    spec = TASKS[args.task]
    candidates = spec.candidates if args.candidates is None else args.candidates
    unknown = [c for c in candidates if c not in spec.candidates]
    if unknown:
        raise SystemExit(f"unknown candidate {unknown[0]!r} for task {args.task}; known: {', '.join(spec.candidates)}")
    meta = {"task": args.task, "steps": args.steps, "seeds": args.seeds, "seed0": args.seed0,
            "candidates": candidates, "torch": torch.__version__}
    if args.task in ("gpt", "gpt-bf16"):
        meta["batch"], meta["warmup"] = args.batch, gpt_warmup(args.steps)
    if args.task == "mnist":
        del meta["task"]  # the files written before there were tasks say none
    out: dict[str, Any] = {"meta": meta, "runs": []}
    if args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        same = {k: old["meta"].get(k) for k in ("task", "steps", "batch")} == {k: meta.get(k) for k in
                                                                             ("task", "steps", "batch")}
        if not same:
            raise SystemExit(f"{args.json} holds runs of another measurement ({old['meta'].get('task', 'mnist')}, "
                             f"{old['meta']['steps']} steps): give another --json")
        out["runs"] = old["runs"]
    done = {(r["candidate"], r["seed"]) for r in out["runs"]}
    for seed in range(args.seed0, args.seed0 + args.seeds):
        for name in candidates:
            if (name, seed) in done:
                continue
            t0 = time.perf_counter()
            if args.task == "mnist":
                r = train(name, args.steps, seed)
            else:
                r = train_suite(args.task, name, args.steps, seed, args.batch)
            out["runs"].append({"candidate": name, "seed": seed, **r, "seconds": time.perf_counter() - t0})
            shown = " ".join(f"{k} {v:.4g}" for k, v in r.items())
            print(f"{name:26s} seed {seed}: {shown} ({time.perf_counter() - t0:.0f}s)", flush=True)
            if args.json:
                write_json(args.json, out)


if __name__ == "__main__":
    main()
