"""Every experiment's figure is readable: axes labelled (the y axis with its unit), a legend, and tick
labels that do not run into each other, at the scales the default runs reach (150k environment steps,
2e6 gradient calls)."""

from __future__ import annotations

import math
import re

import matplotlib
import pytest

matplotlib.use("Agg")

from adoptim_repro import registry, report  # noqa: E402
from adoptim_repro.config import resolve  # noqa: E402
from adoptim_repro.runner import RunResult, Unit  # noqa: E402


def _curve(n: int, last: float) -> list[int]:
    return [round(last * (i + 1) / n) for i in range(n)]


def _results(name: str, cfg) -> list[RunResult]:
    out = []
    for seed in range(2):
        for opt in cfg.optimizers:
            if name == "toy":
                h = [{"step": s, "median": [[0.5 - i * 1e-7 * s for i in range(3)]] * 2,
                      "q25": [[0.0] * 3] * 2, "q75": [[0.9] * 3] * 2} for s in _curve(200, 2_000_000)]
                out.append(RunResult(Unit(opt, seed), [{}], h))
            elif name == "mnist":
                h = [{"step": s, "train_loss": 1.2 / math.sqrt(s / 100), **({"test_accuracy": 0.9 + s / 2e5}
                      if s % 500 == 0 else {})} for s in _curve(100, 10_000)]
                out.append(RunResult(Unit(opt, seed), [{}], h))
            elif name == "vae":
                h = [{"step": s, "train_nelbo": 90 + 2e4 / s, **({"test_nelbo": 95 + 2e4 / s} if s % 250 == 0 else {})}
                     for s in _curve(30, 1500)]
                out.append(RunResult(Unit(opt, seed), [{}], h))
            elif name == "gpt":
                for b in cfg.batch_sizes:
                    h = [{"step": s, "loss": 2 + 3 / s, **({"val_loss": 2.5} if s % 100 == 0 else {})}
                         for s in range(1, 1001)]
                    out.append(RunResult(Unit(opt, seed, (("batch", b),)), [{"spike_steps": [500]}], h))
            elif name == "llama":
                h = [{"step": s, "loss": 2 + 3 / s, **({"val_loss": 2.5} if s % 50 == 0 else {})}
                     for s in range(1, 301)]
                if opt == cfg.optimizers[0]:
                    out.append(RunResult(Unit("adamw", seed, (("stage", "pretrain"),)), [{}], h))
                out.append(RunResult(Unit(opt, seed, (("stage", "finetune"),)), [{}], h))
            elif name == "cifar10":
                h = [{"step": 78 * e, "epoch": e, "test_acc": 0.6 + 0.05 * e} for e in range(1, 6)]
                out.append(RunResult(Unit(opt, seed), [{"dataset": "Fashion-MNIST padded to 32x32"}], h))
            elif name == "imagenet":
                h = [{"step": 1251 * e, "epoch": e, "val_top1": 0.3 + e / 500} for e in range(1, 301)]
                out.append(RunResult(Unit(opt, seed), [{}], h))
            elif name == "rl":
                for env in cfg.env_ids:
                    h = [{"step": 2048 * i, "train_return": -300 + 7 * i} for i in range(1, 74)]
                    out.append(RunResult(Unit(opt, seed, (("env", env),)), [{}], h))
    return out


def _no_overlap(boxes: list, horizontal: bool) -> bool:
    boxes = sorted(boxes, key=lambda b: b.x0 if horizontal else b.y0)
    return all((a.x1 <= b.x0 + 0.5) if horizontal else (a.y1 <= b.y0 + 0.5) for a, b in zip(boxes, boxes[1:]))


def _check(name: str, fig) -> None:
    renderer = fig.canvas.get_renderer()
    assert any(ax.get_legend() is not None and ax.get_legend().get_texts() for ax in fig.axes), "no legend"
    labelled = {ax.get_ylim() for ax in fig.axes if ax.get_ylabel()}
    for ax in fig.axes:
        if not ax.lines:
            continue
        assert ax.get_xlabel().strip(), f"{name}: an x axis without a label"
        if ax.get_ylabel() or ax.get_ylim() not in labelled:  # a panel may share a labelled panel's y axis
            assert re.search(r"\(.+\)", ax.get_ylabel()), f"{name}: y label {ax.get_ylabel()!r} names no unit"
        for axis, horizontal in ((ax.xaxis, True), (ax.yaxis, False)):
            lo, hi = sorted(ax.get_xlim() if horizontal else ax.get_ylim())
            labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()
                      and lo <= t.get_position()[0 if horizontal else 1] <= hi]
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert _no_overlap(boxes, horizontal), (name, [t.get_text() for t in labels])


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.load(n).plot is not None])
def test_every_figure_has_labelled_axes_with_units_a_legend_and_ticks_apart(name, tmp_path, monkeypatch):
    exp = registry.load(name)
    cfg = resolve(exp.config, validate=False)
    import matplotlib.pyplot as plt

    checked = []
    real_close = plt.close

    def check_then_close(fig):  # report.save closes each figure once it is saved: look at it first
        fig.canvas.draw()
        _check(name, fig)
        checked.append(fig)
        real_close(fig)

    monkeypatch.setattr(plt, "close", check_then_close)
    exp.plot(cfg, _results(name, cfg), tmp_path)
    assert checked, f"{name} drew no figure"
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in tmp_path.iterdir())


def test_compact_tick_labels():
    assert [report.compact_number(v) for v in (0, 0.5, 2000, 20000, 150000, 2_000_000, -30000)] == \
        ["0", "0.5", "2000", "20k", "150k", "2M", "-30k"]
    # one unit along an axis: 2000 on an axis that reaches 10,000 is 2k, as 10,000 is 10k
    assert [report.compact_number(v, top=10_000) for v in (0, 2000, 10_000)] == ["0", "2k", "10k"]
