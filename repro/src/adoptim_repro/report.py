"""Summaries and plots shared by the experiments: mean and 95% interval over seeds, Markdown tables,
and a matplotlib figure that works without a display."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (beyond that, see t975).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


@dataclass(frozen=True)
class Stats:
    """Summary statistics of one metric over seeds; spreads are ``None`` (undefined) for one value."""

    n: int
    mean: float
    ci95: float | None  # half-width of the 95% t-interval of the mean
    std: float | None  # sample standard deviation
    min: float
    max: float


def stats(values: Sequence[float]) -> Stats:
    """Mean, 95% t-interval half-width, sample standard deviation, minimum and maximum of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("summary statistics of no values")
    mean = statistics.fmean(values)
    if n < 2:
        return Stats(n, mean, None, None, min(values), max(values))
    sd = statistics.stdev(values)
    return Stats(n, mean, t975(n - 1) * sd / math.sqrt(n), sd, min(values), max(values))


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% t-interval of the mean (``None``, undefined, for a single value)."""
    s = stats(values)
    return s.mean, s.ci95


def interval(values: Sequence[float], difference: bool = False) -> dict[str, Any]:
    """``mean``, ``ci95`` (the 95% t-interval's half-width), its ends ``lo`` and ``hi`` and ``n`` of ``values``;
    with ``difference``, also ``excludes_zero``: whether the interval lies on one side of 0 (``None`` for one value)."""
    s = stats(values)
    lo = None if s.ci95 is None else s.mean - s.ci95
    hi = None if s.ci95 is None else s.mean + s.ci95
    row: dict[str, Any] = {"mean": s.mean, "ci95": s.ci95, "lo": lo, "hi": hi, "n": s.n}
    if difference:
        row["excludes_zero"] = None if lo is None or hi is None else bool(lo > 0 or hi < 0)
    return row


def paired_differences(records: Sequence[dict[str, Any]], metrics: Sequence[str], reference: str = "adopt",
                       key: str = "seed") -> list[dict[str, Any]]:
    """``reference`` minus each other optimizer, paired by ``key`` (the seed: same initialisation and batches),
    per metric: one row per (optimizer, metric) with :func:`interval` of the differences over the shared seeds.

    Records are dicts with ``optimizer``, ``key`` and the metrics; a seed only one side has is left out.
    """
    by = {(r["optimizer"], r[key]): r for r in records}
    names = list(dict.fromkeys(r["optimizer"] for r in records))
    if reference not in names:
        return []
    rows = []
    for other in names:
        if other == reference:
            continue
        seeds = [s for (o, s) in by if o == reference and (other, s) in by]
        for metric in metrics:
            diffs = [by[(reference, s)][metric] - by[(other, s)][metric] for s in seeds]
            if diffs:
                rows.append({"optimizer": other, "metric": metric, **interval(diffs, difference=True)})
    return rows


def with_paired(rows: list[dict[str, Any]], records: Sequence[dict[str, Any]], metrics: Sequence[str],
                reference: str = "adopt") -> list[dict[str, Any]]:
    """``rows`` (one per optimizer) with the paired difference ``reference`` minus that optimizer of each metric:
    columns ``adopt-x <metric>`` (mean over seeds), ``ci95`` and ``excludes 0`` (empty in the reference's row)."""
    diffs = {(d["optimizer"], d["metric"]): d for d in paired_differences(records, metrics, reference)}
    out = []
    for row in rows:
        row = dict(row)
        for metric in metrics:
            d = diffs.get((row["optimizer"], metric))
            col = f"{reference}-x {metric}"
            row[col] = d["mean"] if d else None
            row[f"{col} ci95"] = d["ci95"] if d else None
            row[f"{col} excludes 0"] = (None if d["excludes_zero"] is None else
                                        ("yes" if d["excludes_zero"] else "no")) if d else None
        out.append(row)
    return out


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom.

    Tabulated to 30; beyond, the Cornish-Fisher expansion around the normal's 1.96 (within 1e-4 there).
    """
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def group(records: Iterable[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Records grouped by the values of ``keys``, in first-seen order."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v)
    return str(v)


def markdown(title: str, rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (columns in first-seen order) under a heading."""
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, Any]:
    """A matplotlib figure with a ``nrows x ncols`` grid of axes (always a 2-D array), off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def compact_number(value: float, top: float | None = None) -> str:
    """A tick label short enough not to run into its neighbours: 150000 -> 150k, 2000000 -> 2M.

    ``top`` (the largest value on the axis) picks one unit for all of an axis's labels.
    """
    top = abs(value) if top is None else abs(top)
    if value == 0:
        return "0"
    if top >= 1e6:
        return f"{value / 1e6:g}M"
    if top >= 1e4:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


def _compact_formatter(axis: Any) -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: compact_number(v, max(abs(x) for x in axis.get_view_interval())))


def save(fig: Any, path: Path) -> None:
    """Save ``fig`` as a small PNG (written beside and renamed, like every result) and close it.

    Linear axes get compact tick labels (150k, 2M): long step counts would otherwise run together.
    """
    import matplotlib.pyplot as plt

    from . import _io

    path = Path(path)
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "linear":
                axis.set_major_formatter(_compact_formatter(axis))
    fig.tight_layout()
    _io._atomic(path, lambda f: fig.savefig(f, format="png", dpi=80), "wb")
    plt.close(fig)


def mean_curve(histories: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    """The mean of metric ``key`` over several runs' histories, at the steps where all of them have it."""
    per_run = [{h["step"]: h[key] for h in hist if key in h} for hist in histories]
    if not per_run:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_run)))
    return steps, [statistics.fmean(d[s] for d in per_run) for s in steps]
