"""ImageNet classification with Swin-T (timm): AdamW against ADOPT with decoupled weight decay.

Claim tested: trained with the Swin Transformer recipe (lr 1e-3 at batch 1024, weight decay 0.05
decoupled and off for norms, biases and position tables, 20 warm-up epochs then a cosine schedule,
300 epochs, RandAugment, Mixup/CutMix, label smoothing, random erasing, stochastic depth, gradient
clipping at 5), ADOPT reaches a top-1 accuracy at least as high as AdamW's (the paper's ImageNet
experiment). The metric is top-1 validation accuracy.

Run: ``adoptim imagenet --set data_dir=PATH --device cuda`` (under ``torchrun`` for several GPUs);
``adoptim imagenet --quick`` is the smoke run described below.

Full scale only: ``--set data_dir=PATH`` to an ImageFolder tree with ``train/<class>/*`` and
``val/<class>/*``, run under ``torchrun`` on GPUs (``--device cuda``). ``--quick`` is a smoke run that
proves the path at tiny size: a Swin from timm with one block per stage on 32x32 images, trained for
two epochs on a few hundred Fashion-MNIST images written out as an ImageFolder tree (labelled as such
in every record); its accuracy says nothing about the paper's claim.

Needs ``timm`` (which needs ``torchvision``); both are imported only when a run starts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import image_data, report
from .config import ConfigError
from .optimizers import OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit, seed_units
from .schedule import Schedule, WarmupCosine

SMOKE_NAME = "Fashion-MNIST as 32x32 RGB ImageFolder (smoke run, not ImageNet)"


def _specs() -> dict[str, OptimSpec]:
    return default_specs(adamw=OptimSpec(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
                         adoptw=OptimSpec(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.05))


@dataclass
class ImagenetConfig:
    """Swin-T on an ImageFolder dataset with the Swin recipe; ``None`` model fields keep timm's Swin-T."""

    data_dir: str | None = None
    """an ImageFolder root with train/<class>/* and val/<class>/*; none = the --quick smoke data"""
    smoke_per_class: int = 0
    """smoke run: Fashion-MNIST images per class written as an ImageFolder (0 = no smoke run)"""
    model: str = "swin_tiny_patch4_window7_224"
    """timm model name"""
    img_size: int = 224
    """input resolution in pixels"""
    patch_size: int | None = None
    """override timm's patch size; none = the model's"""
    window_size: int | None = None
    """override the attention window; none = the model's"""
    embed_dim: int | None = None
    """override the embedding width; none = the model's"""
    depths: tuple[int, ...] | None = None
    """override the blocks per stage; none = the model's"""
    num_heads: tuple[int, ...] | None = None
    """override the heads per stage; none = the model's"""
    drop_path: float = 0.2
    """stochastic-depth rate"""
    epochs: int = 300
    """training epochs"""
    warmup_epochs: int = 20
    """epochs of linear warm-up from warmup_lr"""
    batch_size: int = 1024
    """global images per step (split over processes)"""
    warmup_lr: float = 1e-6
    """lr at the start of the warm-up"""
    min_lr: float = 1e-5
    """lr at the end of the cosine decay"""
    clip_grad: float = 5.0
    """gradient-norm clipping threshold (0 = off)"""
    label_smoothing: float = 0.1
    """label smoothing of the targets"""
    mixup: float = 0.8
    """Mixup alpha (0 = off)"""
    cutmix: float = 1.0
    """CutMix alpha (0 = off)"""
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    """timm's RandAugment policy string (empty = off)"""
    random_erase: float = 0.25
    """random-erasing probability"""
    workers: int = 8
    """data-loader worker processes"""
    seeds: int = 1
    """seeds 0..N-1 are run for each optimizer (mean and 95% interval over them)"""
    optimizers: tuple[str, ...] = ("adamw", "adoptw")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=_specs)
    """each optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""

    def validate(self) -> None:
        for key in ("img_size", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"config key 'warmup_epochs' must be in [0, epochs={self.epochs}), "
                             f"got {self.warmup_epochs}")
        if self.workers < 0 or self.smoke_per_class < 0:
            raise ValueError("config keys 'workers' and 'smoke_per_class' must be >= 0")
        if not self.data_dir and not self.smoke_per_class:
            raise ValueError("config key 'data_dir' is not set: give an ImageFolder root with train/ and "
                             "val/ (the full-scale run), or use --quick for the smoke run")


def _timm() -> Any:
    try:
        import timm
        import timm.data
    except Exception as e:  # timm's import fails with several error types when torchvision is broken
        raise ConfigError(f"the imagenet experiment needs timm and torchvision importable ({e})") from None
    return timm


_ARCH_KEYS = ("patch_size", "window_size", "embed_dim", "depths", "num_heads")


def model_label(cfg: ImagenetConfig) -> str:
    """``cfg.model``, followed by the architecture fields that override timm's for it (as in the tables)."""
    overrides = [f"{k}={getattr(cfg, k)}" for k in _ARCH_KEYS if getattr(cfg, k) is not None]
    return f"{cfg.model} with {', '.join(overrides)}" if overrides else cfg.model


def build_model(cfg: ImagenetConfig, num_classes: int) -> nn.Module:
    """timm's ``cfg.model``, with any architecture fields that are set overriding its defaults."""
    kw: dict[str, Any] = {"num_classes": num_classes, "img_size": cfg.img_size, "drop_path_rate": cfg.drop_path}
    for key in _ARCH_KEYS:
        if getattr(cfg, key) is not None:
            kw[key] = getattr(cfg, key)
    return _timm().create_model(cfg.model, pretrained=False, **kw)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices and kernels: not norms, biases or the model's ``no_weight_decay`` set."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        quiet = p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip)
        (no_decay if quiet else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(cfg: ImagenetConfig, base: float, steps_per_epoch: int) -> WarmupCosine:
    """Linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then cosine from ``base`` to ``min_lr``."""
    return WarmupCosine(base, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch,
                        floor=cfg.min_lr / base, start=cfg.warmup_lr, reach_peak_after_warmup=True)


def preflight(cfg: ImagenetConfig) -> None:
    """timm importable, and the data folders there, before anything is written."""
    _timm()
    if cfg.data_dir:
        for split in ("train", "val"):
            folder = Path(cfg.data_dir) / split
            if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
                raise ValueError(f"config key 'data_dir': {cfg.data_dir!r} needs {split}/<class>/ image folders "
                                 "(the ImageFolder layout)")
    elif not (image_data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise ValueError(f"the smoke run reads Fashion-MNIST from {image_data.FASHION_MNIST_DIR}: install the "
                         "Debian package 'dataset-fashion-mnist'")


def _smoke_root(cfg: ImagenetConfig, ctx: RunContext) -> Path:
    root = ctx.out / "smoke_data"
    if ctx.is_main and not (root / "done").exists():
        train, test = image_data.load_fashion_mnist32()
        image_data.write_image_folder(train, root / "train", cfg.smoke_per_class)
        image_data.write_image_folder(test, root / "val", max(1, cfg.smoke_per_class // 2))
        (root / "done").write_text("ok\n")
    ctx.dist.barrier()
    return root


def _loaders(cfg: ImagenetConfig, root: Path, ctx: RunContext, seed: int) -> tuple[Any, Any, int]:
    tdata = _timm().data
    train_tf = tdata.create_transform(cfg.img_size, is_training=True, auto_augment=cfg.rand_augment or None,
                                      re_prob=cfg.random_erase, interpolation="bicubic")
    val_tf = tdata.create_transform(cfg.img_size, is_training=False, interpolation="bicubic",
                                    crop_pct=1.0 if cfg.img_size <= 64 else 0.875)
    train = image_data.ImageFolder(root / "train", train_tf)
    val = image_data.ImageFolder(root / "val", val_tf)
    if val.classes != train.classes:
        raise ValueError(f"{root}: train/ and val/ hold different class folders")
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) must split over {ctx.world_size} processes")
    per = cfg.batch_size // ctx.world_size
    if len(train) < cfg.batch_size:
        raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) exceeds the {len(train)} training images")
    sampler = torch.utils.data.DistributedSampler(train, ctx.world_size, ctx.rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    val_sampler = torch.utils.data.DistributedSampler(val, ctx.world_size, ctx.rank, shuffle=False)
    kw = dict(num_workers=cfg.workers, pin_memory=ctx.device.type == "cuda", persistent_workers=cfg.workers > 0)
    return (torch.utils.data.DataLoader(train, per, sampler=sampler, drop_last=True, **kw),
            torch.utils.data.DataLoader(val, per, sampler=val_sampler, **kw), len(train.classes))


def evaluate(model: nn.Module, loader: Any, ctx: RunContext) -> float:
    """Top-1 accuracy over the validation set (each process scores its share; counts are summed)."""
    model.eval()
    right = total = 0
    with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.device.type == "cuda"):
        for x, y in loader:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            right += int((model(x).argmax(1) == y).sum())
            total += y.numel()
    right, total = ctx.dist.all_sum([right, total])
    model.train()
    return right / total


def run(cfg: ImagenetConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Train one Swin with ``unit.optimizer``; return its top-1 validation accuracy."""
    timm = _timm()
    root = Path(cfg.data_dir) if cfg.data_dir else _smoke_root(cfg, ctx)
    try:
        train_loader, val_loader, n_classes = _loaders(cfg, root, ctx, unit.seed)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'data_dir': {e}") from None
    torch.manual_seed(unit.seed)
    model = build_model(cfg, n_classes).to(ctx.device)
    net = ctx.dist.wrap(model)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, param_groups(model, spec.weight_decay), spec)
    mix = timm.data.Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=n_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    steps_per_epoch = len(train_loader)
    schedule = Schedule(opt, lr_schedule(cfg, spec.lr, steps_per_epoch))
    epoch, step = 0, 0
    saved = ctx.resume()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        epoch, step = saved["epoch"], saved["step"]
        schedule.load_state_dict(saved.get("schedule", {"last_epoch": step}))
    ctx.progress(cfg.epochs * steps_per_epoch, step)
    t0 = time.time()
    while epoch < cfg.epochs:
        train_loader.sampler.set_epoch(epoch)
        # The epoch's random draws, the same after a resume: torch's (crops, flips), numpy's (timm's Mixup
        # and CutMix) and Python's (RandAugment) generators, in this process (workers=0) or as the seeds
        # of the loader's workers.
        epoch_seed = unit.seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)
        np.random.seed(epoch_seed % 2**32)
        random.seed(epoch_seed)
        for x, y in train_loader:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            if mix is not None and len(y) % 2 == 0:
                x, target = mix(x, y)
            else:
                target = nn.functional.one_hot(y, n_classes).float()
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=ctx.device.type == "cuda"):
                loss = torch.sum(-target * torch.log_softmax(net(x).float(), -1), -1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            schedule.step()
            step += 1
            ctx.update(step, loss=loss.item())
        epoch += 1
        acc = evaluate(model, val_loader, ctx)
        ctx.log(step, epoch=epoch, train_loss=loss.item(), val_top1=acc)
        ctx.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict(),
                        "epoch": epoch, "step": step}, force=epoch < cfg.epochs)
    dataset = f"ImageFolder {root.name}" if cfg.data_dir else SMOKE_NAME
    return {"dataset": dataset, "model": model_label(cfg), "params": sum(p.numel() for p in model.parameters()),
            "img_size": cfg.img_size, "epochs": cfg.epochs, "train_images": len(train_loader.dataset),
            "val_top1": evaluate(model, val_loader, ctx), "train_seconds": round(time.time() - t0, 1)}


def summarize(cfg: ImagenetConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer: top-1 validation accuracy (mean and 95% interval over seeds)."""
    rows = []
    for (name,), recs in report.group(records, "optimizer").items():
        mean, ci = report.mean_ci95([100 * r["val_top1"] for r in recs])
        rows.append({"optimizer": name, "dataset": recs[0]["dataset"], "model": recs[0]["model"],
                     "params": recs[0]["params"], "epochs": recs[0]["epochs"], "seeds": len(recs),
                     "val_top1_%": mean, "ci95": ci})
    return rows


def plot(cfg: ImagenetConfig, results: list[RunResult], out: Path) -> None:
    """Validation top-1 after each epoch per optimizer (skipped when matplotlib is not installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    fig, axes = report.figure(1, 1, size=(5.0, 3.2))
    ax = axes[0][0]
    for res in results:
        pts = [(h["epoch"], 100 * h["val_top1"]) for h in res.history if "val_top1" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=f"{res.unit.optimizer} s{res.unit.seed}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 accuracy (%)")
    ax.legend(fontsize=8)
    report.save(fig, out / "imagenet.png")


EXPERIMENT = Experiment(
    name="imagenet",
    summary=("Swin-T (timm) on ImageFolder data, Swin recipe, adamw vs adoptw; full scale only "
             "(--quick: tiny smoke run on Fashion-MNIST images, not ImageNet); needs timm"),
    paper_scale="paper: ImageNet-1k, Swin-T, 300 epochs at batch 1024: --set data_dir=PATH under "
                "torchrun on 8 GPUs (days)",
    requires=(("timm", "pip install 'adoptim-repro[imagenet]'"),
              ("torchvision", "install the torchvision built for this torch (timm imports it)")),
    preflight=preflight,
    config=ImagenetConfig,
    quick={"smoke_per_class": 16, "img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 24,
           "depths": (1, 1, 1), "num_heads": (1, 2, 4), "drop_path": 0.0, "epochs": 2, "warmup_epochs": 1,
           "batch_size": 32, "workers": 0, "rand_augment": "rand-m9-mstd0.5-inc1"},
    units=seed_units,
    run=run,
    summarize=summarize,
    plot=plot,
)
