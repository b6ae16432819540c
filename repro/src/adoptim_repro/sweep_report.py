"""The reports of a sweep (:mod:`.sweep`): its tables, its figures and its documentation page.

Every number comes from the cells' records: :func:`summarize` makes the tables of ``summary.json``,
:func:`plot` the heatmaps and the curves against beta2, :func:`doc_page` the page ``--doc`` writes.
A seed that diverged counts as making no progress: its loss is the loss at initialisation
(:func:`capped`, Wortsman et al.'s ``min(loss, loss at init)``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import _io, report
from .runner import QUICK_NOTE

Record = dict[str, Any]


# --------------------------------------------------------------------------- the reports
def capped(r: Record) -> float:
    """A seed's loss for the comparisons: ``min(test loss, loss at init)``; a diverged seed's is the init loss."""
    if r["diverged_step"] is not None or r["test_loss"] is None:
        return r["init_loss"]
    return min(r["test_loss"], r["init_loss"])


def summarize(cfg: Any, records: list[Record]) -> Record:
    """Every table of the sweep's report (the ``summary.json`` keys besides the config).

    - ``final``: per cell, the mean test loss and accuracy over its non-diverged seeds (95% interval)
      and how many seeds diverged (at which earliest step).
    - ``best_lr``: per optimizer, the lr with the lowest capped loss averaged over the beta2 grid.
    - ``at_best_lr``: per optimizer and beta2, the capped test loss at that lr (mean, 95% interval).
    - ``sensitivity``: per optimizer and beta2, the learning-rate sensitivity of Wortsman et al. (2023),
      per seed the mean over the lr grid of ``min(loss(lr), loss at init)`` minus the best of them;
      mean and 95% interval over seeds.
    - ``paired``: per beta2, ADOPT minus Adam paired by seed, of the capped loss at each one's best lr
      and of the sensitivity, with 95% interval and whether it excludes zero.
    - ``spikes`` (where the records count loss spikes, as the gpt task's do): per optimizer and beta2,
      over the seed runs of every lr, how many spiked, the mean spikes per run (95% interval) and the
      largest ratio of a loss to the median before it (see :func:`spikes`).
    """
    by = {(r["optimizer"], r["beta2"], r["lr"], r["seed"]): r for r in records}
    opts, beta2s, lrs, seeds = list(cfg.optimizers), list(cfg.beta2s), list(cfg.lrs), list(range(cfg.seeds))
    final = []
    for o in opts:
        for b in beta2s:
            for lr in lrs:
                rs = [by[(o, b, lr, s)] for s in seeds]
                ok = [r for r in rs if r["diverged_step"] is None]
                div = [r["diverged_step"] for r in rs if r["diverged_step"] is not None]
                loss = report.stats([r["test_loss"] for r in ok]) if ok else None
                accs = [100 * r["test_accuracy"] for r in ok if r["test_accuracy"] is not None]
                acc = report.stats(accs) if accs else None
                final.append({"optimizer": o, "beta2": b, "lr": lr,
                              "test_loss": loss.mean if loss else None, "ci95": loss.ci95 if loss else None,
                              "test_accuracy_%": acc.mean if acc else None,
                              "capped_loss": sum(capped(r) for r in rs) / len(rs), "diverged": len(div),
                              "diverged_step": min(div) if div else None, "seeds": len(rs)})
                if all("spikes" in r for r in rs):
                    final[-1].update(spikes=sum(r["spikes"] for r in rs),
                                     spiked_seeds=sum(r["spikes"] > 0 for r in rs))
    best_lr = {}
    for o in opts:
        score = {lr: sum(capped(by[(o, b, lr, s)]) for b in beta2s for s in seeds) for lr in lrs}
        best_lr[o] = min(lrs, key=lambda lr: score[lr])
    at_best, sens_rows, per_seed_sens = [], [], {}
    for o in opts:
        for b in beta2s:
            vals = [capped(by[(o, b, best_lr[o], s)]) for s in seeds]
            at_best.append({"optimizer": o, "beta2": b, "lr": best_lr[o], **report.interval(vals)})
            sens = []
            for s in seeds:
                losses = [capped(by[(o, b, lr, s)]) for lr in lrs]
                sens.append(sum(losses) / len(losses) - min(losses))
            per_seed_sens[(o, b)] = sens
            sens_rows.append({"optimizer": o, "beta2": b, **report.interval(sens)})
    paired = []
    if "adam" in opts and "adopt" in opts:
        for b in beta2s:
            d_loss = [capped(by[("adopt", b, best_lr["adopt"], s)]) - capped(by[("adam", b, best_lr["adam"], s)])
                      for s in seeds]
            d_sens = [x - y for x, y in zip(per_seed_sens[("adopt", b)], per_seed_sens[("adam", b)], strict=True)]
            paired.append({"beta2": b, "metric": "test loss at best lr", **report.interval(d_loss, True)})
            paired.append({"beta2": b, "metric": "lr sensitivity", **report.interval(d_sens, True)})
    out = {"final": final, "best_lr": best_lr, "at_best_lr": at_best, "sensitivity": sens_rows, "paired": paired}
    if records and all("spikes" in r for r in records):
        out["spikes"] = spikes(cfg, records)
    return out


def spikes(cfg: Any, records: list[Record]) -> list[Record]:
    """Per optimizer and beta2, the loss spikes of its seed runs over the whole lr grid (n = lrs x seeds):
    the runs with at least one spike, the mean spikes per run (95% interval over the runs), the runs that
    diverged, and the largest ratio of a finite loss to the median of the window before it (``peak_ratio``)."""
    rows = []
    for o in cfg.optimizers:
        for b in cfg.beta2s:
            rs = [r for r in records if r["optimizer"] == o and r["beta2"] == b]
            peaks = [r["peak_ratio"] for r in rs if r.get("peak_ratio") is not None]
            top = max(rs, key=lambda r: r.get("peak_ratio") or 0.0)
            rows.append({"optimizer": o, "beta2": b, "runs": len(rs), "spiked": sum(r["spikes"] > 0 for r in rs),
                         **report.interval([float(r["spikes"]) for r in rs]),
                         "diverged": sum(r["diverged_step"] is not None for r in rs),
                         "peak_ratio": max(peaks) if peaks else None, "peak_lr": top["lr"] if peaks else None})
    return rows


def _table(title: str, rows: list[Record]) -> str:
    return report.markdown(title, rows).replace("# ", "## ", 1)


def markdown(task: str, summary: Record) -> str:
    """``summary.md``: the tables of :func:`summarize`."""
    best = ", ".join(f"{o} {lr:g}" for o, lr in summary["best_lr"].items())
    parts = [f"# sweep {task}\n", f"Best lr per optimizer (lowest capped test loss over the beta2 grid): {best}\n",
             _table("Paired difference ADOPT minus Adam (by seed; negative = ADOPT better)", summary["paired"]),
             _table("Test loss at each optimizer's best lr", summary["at_best_lr"]),
             _table("LR sensitivity (Wortsman et al. 2023)", summary["sensitivity"]),
             *([_table("Loss spikes per seed run, over the lr grid", summary["spikes"])]
               if "spikes" in summary else []),
             _table("Every cell", summary["final"])]
    return "\n".join(parts)


def _beta2_x(b: float) -> float:
    return -math.log10(1.0 - b)  # 0.5 -> 0.3, 0.9 -> 1, 0.99 -> 2, 0.9999 -> 4: the grid spread evenly


def plot(cfg: Any, summary: Record, out: Path, title: str) -> list[Path]:
    """``heatmaps.png`` (mean test loss over (beta2, lr), one panel per optimizer, one colour scale,
    diverged cells hatched) and ``beta2.png`` (the loss at best lr and the lr sensitivity against beta2)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    opts, beta2s, lrs = list(cfg.optimizers), list(cfg.beta2s), list(cfg.lrs)
    cell = {(r["optimizer"], r["beta2"], r["lr"]): r for r in summary["final"]}
    values = [r["test_loss"] for r in summary["final"] if r["test_loss"] is not None and r["diverged"] == 0]
    lo, hi = (min(values), max(values)) if values else (0.1, 1.0)
    norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.01))
    fig, axes = report.figure(1, len(opts), size=(0.55 * len(lrs) + 1.6, 0.4 * len(beta2s) + 1.4))
    image = None
    for ax, o in zip(axes[0], opts, strict=True):
        grid = np.full((len(beta2s), len(lrs)), np.nan)
        for i, b in enumerate(beta2s):
            for j, lr in enumerate(lrs):
                r = cell[(o, b, lr)]
                if r["diverged"] == 0 and r["test_loss"] is not None:
                    grid[i, j] = r["test_loss"]
                    dark = norm(r["test_loss"]) > 0.6  # the reversed map is dark at high loss: white text there
                    ax.text(j, i, f"{r['test_loss']:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
                else:
                    ax.add_patch(_hatch(j, i))
                    ax.text(j, i, f"div\n{r['diverged']}/{r['seeds']}", ha="center", va="center", fontsize=6,
                            color="darkred")
        image = ax.imshow(grid, norm=norm, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7, rotation=45)
        first = ax is axes[0][0]  # one beta2 axis for the row: the panels share it
        ax.set_yticks(range(len(beta2s)), [f"{b:g}" for b in beta2s] if first else [], fontsize=7)
        ax.set_xlabel("lr (alpha)")
        ax.set_title(o, fontsize=9)
    axes[0][0].set_ylabel("beta2")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="test loss (mean over seeds)")
    fig.suptitle(title + "; hatched: a seed diverged", fontsize=9, y=1.04)
    paths = [out / "heatmaps.png"]
    _save_plain(fig, paths[0])

    fig, axes = report.figure(1, 2, size=(4.2, 3.0))
    xs = [_beta2_x(b) for b in beta2s]
    for key, ax, label in (("at_best_lr", axes[0][0], "test loss at best lr"),
                           ("sensitivity", axes[0][1], "lr sensitivity")):
        for n, o in enumerate(opts):
            rows = {r["beta2"]: r for r in summary[key] if r["optimizer"] == o}
            shift = (n - (len(opts) - 1) / 2) * 0.06  # side by side, so the bars do not hide each other
            lr_note = f" (lr {summary['best_lr'][o]:g})" if key == "at_best_lr" else ""
            ax.errorbar([x + shift for x in xs], [rows[b]["mean"] for b in beta2s],
                        yerr=[rows[b]["ci95"] or 0.0 for b in beta2s], label=o + lr_note, capsize=2, lw=1.2,
                        marker="o", ms=3)
        ax.set_xticks(xs, [f"{b:g}" for b in beta2s], fontsize=7, rotation=45)
        ax.set_xlabel("beta2")
        ax.set_ylabel(label + " (95% interval)")
        ax.legend(fontsize=7)
    axes[0][0].set_title(title, fontsize=8)
    paths.append(out / "beta2.png")
    fig.tight_layout()
    _save_plain(fig, paths[1])  # report.save would relabel the beta2 ticks with their positions
    return paths


def _hatch(j: int, i: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="xx", edgecolor="darkred", lw=0)


def _save_plain(fig: Any, path: Path) -> None:
    # report.save's tight_layout fights a colorbar shared by several axes, and its tick formatter would
    # replace fixed labels: save with the bounding box instead.
    import matplotlib.pyplot as plt

    _io._atomic(path, lambda f: fig.savefig(f, format="png", dpi=80, bbox_inches="tight"), "wb")
    plt.close(fig)


# --------------------------------------------------------------------------- the documentation page
def _machines(cpus: list[int] | None) -> str:
    # " of a 2-CPU machine", " of 2- and 16-CPU machines"; nothing where a cell did not record it
    if not cpus:
        return ""
    if len(cpus) == 1:
        return f" of a {cpus[0]}-CPU machine"
    return " of " + ", ".join(f"{n}-" for n in cpus[:-1]) + f" and {cpus[-1]}-CPU machines"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _verdicts(summary: Record) -> list[str]:
    """Sentences, each from numbers of the summary, saying where the claim holds here and where not."""
    out = []
    at_best = summary["at_best_lr"]
    ranges = {}
    for o, lr in summary["best_lr"].items():
        means = [r["mean"] for r in at_best if r["optimizer"] == o]
        ranges[o] = max(means) - min(means)
        diverged = sum(r["diverged"] for r in summary["final"] if r["optimizer"] == o)
        runs = sum(r["seeds"] for r in summary["final"] if r["optimizer"] == o)
        out.append(f"**{o}** at its best lr {lr:g}: the test loss ranges over {_num(ranges[o])} across the beta2 "
                   f"grid ({_num(min(means))} to {_num(max(means))}); {diverged} of its {runs} seed runs diverged "
                   "over the whole grid.")
    for o in summary["best_lr"]:
        rows = sorted((r for r in at_best if r["optimizer"] == o), key=lambda r: r["mean"])
        out.append(f"{o}'s best beta2 at that lr is {rows[0]['beta2']:g} ({_num(rows[0]['mean'])}), its worst "
                   f"{rows[-1]['beta2']:g} ({_num(rows[-1]['mean'])}).")
    adam_div = sum(r["diverged"] for r in summary["final"] if r["optimizer"] == "adam")
    if "adam" in summary["best_lr"] and adam_div == 0:
        low = min(r["beta2"] for r in summary["final"])
        out.append(f"Adam diverged in no cell, at any beta2 down to {low:g} and any lr of the grid: on this task at "
                   "this length Adam does not need a problem-dependent beta2 to converge, so the title's contrast "
                   "can only show as a difference in how well each trains.")
    if "adam" in ranges and "adopt" in ranges:
        less = ranges["adopt"] < ranges["adam"]
        out.append(f"Sensitivity to beta2 at the best lr: ADOPT's range is {'smaller' if less else 'not smaller'} than "
                   f"Adam's ({_num(ranges['adopt'])} against {_num(ranges['adam'])}).")
    for metric in ("test loss at best lr", "lr sensitivity"):
        rows = [r for r in summary["paired"] if r["metric"] == metric]
        better = [f"{r['beta2']:g}" for r in rows if r["excludes_zero"] and r["mean"] < 0]
        worse = [f"{r['beta2']:g}" for r in rows if r["excludes_zero"] and r["mean"] > 0]
        tied = [f"{r['beta2']:g}" for r in rows if not r["excludes_zero"]]
        parts = [f"ADOPT lower (better) at beta2 {', '.join(better)}" if better else "ADOPT lower at no beta2",
                 f"Adam lower at {', '.join(worse)}" if worse else "Adam lower at none",
                 f"no difference the 95% interval can resolve at {', '.join(tied)}" if tied else ""]
        out.append(f"Paired by seed, {metric}: " + "; ".join(p for p in parts if p) + ".")
    return out


def _length_check(summary: Record, long: Record) -> list[str]:
    """Lines comparing the optimizers' ranking in the sweep with a longer sweep over some of its cells."""
    short = {(r["optimizer"], r["beta2"], r["lr"]): r for r in summary["final"]}
    rows = [r for r in long["final"] if (r["optimizer"], r["beta2"], r["lr"]) in short]
    steps = (summary["config"]["steps"], long["config"]["steps"])
    lines = ["", f"### The ranking at {steps[1]:,} steps ({steps[1] / steps[0]:g}x the cells' length)", "",
             f"`adoptim sweep {long['experiment'].removeprefix('sweep-')} "
             + " ".join(f"--set {k}={','.join(f'{x:g}' if isinstance(x, float) else str(x) for x in v)}"
                        for k, v in long["config"].items() if k in ("beta2s", "lrs", "optimizers"))
             + f" --set steps={steps[1]} --out results/{long['experiment']}-long` (and `--doc-long` that folder): "
             "the same seeds. Loss: min(test loss, loss at init), mean over seeds.", "",
             f"| beta2 | lr | order at {steps[0]} steps | order at {steps[1]} steps | same |", "|---|---|---|---|---|"]
    same_all: list[bool] = []
    pairs: list[tuple[list[str], list[str]]] = []
    for (b, lr), rs in report.group(rows, "beta2", "lr").items():
        if len(rs) < 2:
            continue
        a = sorted(((r["optimizer"], short[(r["optimizer"], b, lr)]["capped_loss"]) for r in rs), key=lambda t: t[1])
        z = sorted(((r["optimizer"], r["capped_loss"]) for r in rs), key=lambda t: t[1])
        pairs.append(([o for o, _ in a], [o for o, _ in z]))
        same = [o for o, _ in a] == [o for o, _ in z]
        same_all.append(same)
        lines.append(f"| {b:g} | {lr:g} | {' < '.join(f'{o} {v:.3g}' for o, v in a)} | "
                     f"{' < '.join(f'{o} {v:.3g}' for o, v in z)} | {'yes' if same else 'no'} |")
    pair = [(a.index("adopt") < a.index("adam")) == (z.index("adopt") < z.index("adam"))
            for a, z in pairs if "adopt" in a and "adam" in a]
    lines += ["", f"The ranking is the same in {sum(same_all)} of {len(same_all)} (beta2, lr) points"
              + (f"; ADOPT against Adam alone, in {sum(pair)} of {len(pair)}." if pair else ".")]
    diffs = [r for r in long["paired"] if r["metric"] == "test loss at best lr"]
    if diffs:
        lines += ["", f"ADOPT minus Adam at {steps[1]:,} steps, paired by seed: "
                  + "; ".join(f"beta2 {r['beta2']:g}: {_num(r['mean'])} [{_num(r['lo'])}, {_num(r['hi'])}]"
                              + (" (excludes 0)" if r["excludes_zero"] else "") for r in diffs) + "."]
    return lines


ADAM_LIKE = ("adam", "amsgrad", "adamw")
ADOPT_LIKE = ("adopt", "adoptw")


def _spike_table(summary: Record) -> list[str]:
    opts = list(summary["config"]["optimizers"])
    rows = {(r["optimizer"], r["beta2"]): r for r in summary["spikes"]}
    lines = ["| beta2 | " + " | ".join(opts) + " |", "|---|" + "---|" * len(opts)]
    for b in summary["config"]["beta2s"]:
        cells = []
        for o in opts:
            r = rows[(o, b)]
            cells.append(f"{r['spiked']}/{r['runs']}, {_num(r['mean'], 2)} ± {_num(r['ci95'], 2)}, "
                         f"max {_num(r['peak_ratio'])}x" + (f", {r['diverged']} div" if r["diverged"] else ""))
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    return lines


def _spike_verdicts(sweeps: list[Record]) -> list[str]:
    """Sentences, each from the spike tables of the sweeps (one per batch size), on where Adam spikes."""
    out, adam_total, adam_runs = [], 0, 0
    for sm in sweeps:
        batch, rows = sm["config"]["batch_size"], sm["spikes"]
        for family, names in (("Adam (" + ", ".join(o for o in ADAM_LIKE if o in sm["config"]["optimizers"]) + ")",
                               ADAM_LIKE),
                              ("ADOPT (" + ", ".join(o for o in ADOPT_LIKE if o in sm["config"]["optimizers"]) + ")",
                               ADOPT_LIKE)):
            mine = [r for r in rows if r["optimizer"] in names]
            if not mine:
                continue
            spiked, runs = sum(r["spiked"] for r in mine), sum(r["runs"] for r in mine)
            if names == ADAM_LIKE:
                adam_total, adam_runs = adam_total + spiked, adam_runs + runs
            where = [f"beta2 {r['beta2']:g} ({r['optimizer']}, {r['spiked']}/{r['runs']})" for r in mine if r["spiked"]]
            top = max((r for r in mine if r["peak_ratio"] is not None), key=lambda r: r["peak_ratio"], default=None)
            out.append(f"Batch {batch}, {family}: {spiked} of {runs} seed runs spiked"
                       + (f", at {'; '.join(where)}" if where else "")
                       + (f"; the largest loss over its running median is {top['peak_ratio']:.3g}x "
                          f"({top['optimizer']}, beta2 {top['beta2']:g}, lr {top['peak_lr']:g})" if top else "") + ".")
    if adam_runs and adam_total == 0:
        factor = sweeps[0]["config"]["spike_factor"]
        out.append(f"No regime of {'these grids' if len(sweeps) > 1 else 'this grid'} makes Adam spike at this scale: "
                   f"0 of its {adam_runs} seed runs at batch "
                   f"{' and '.join(str(sm['config']['batch_size']) for sm in sweeps)} exceed {factor:g}x the running "
                   "median; the paper's spikes at a small batch are not reproduced here.")
    return out


def _spike_section(summary: Record, other: Record | None, other_command: str | None) -> list[str]:
    sweeps = [summary] + ([other] if other is not None else [])
    sweeps.sort(key=lambda sm: sm["config"]["batch_size"])
    cfg = summary["config"]
    lines = ["", "### Loss spikes, over beta2, at a small and a large batch", "",
             f"A spike is the gpt experiment's: a step whose training loss exceeds {cfg['spike_factor']:g}x the median "
             f"of the {cfg['spike_window']} losses before it, counted once per rise (no spike in the first "
             f"{cfg['spike_window']} steps). Per optimizer and beta2, over the seed runs of every lr of the grid: "
             "runs that spiked / runs, mean spikes per run ± 95% interval, the largest ratio of a loss to the median "
             "before it (max), and runs that diverged (div; a diverged run's first non-finite loss counts as a spike, "
             "as the experiment counts it).", ""]
    if other is not None and other_command:
        lines += [f"The batch {other['config']['batch_size']} sweep: `{other_command}` (the same seeds; its grid "
                  f"{len(other['config']['lrs'])} lrs x {len(other['config']['beta2s'])} beta2 x "
                  f"{', '.join(other['config']['optimizers'])}).", ""]
    lines += [f"- {v}" for v in _spike_verdicts(sweeps)]
    for sm in sweeps:
        lines += ["", f"Batch {sm['config']['batch_size']} ({sm['config']['steps']} steps, lrs "
                  f"{', '.join(f'{lr:g}' for lr in sm['config']['lrs'])}):", "", *_spike_table(sm)]
    if other is not None:
        diffs = [r for r in other["paired"] if r["metric"] == "test loss at best lr"]
        if diffs:
            best = other["best_lr"]
            lines += ["", f"Held-out loss at batch {other['config']['batch_size']}, ADOPT minus Adam at each one's "
                      f"best lr (adam {best.get('adam', 0):g}, adopt {best.get('adopt', 0):g}), paired by seed: "
                      + "; ".join(f"beta2 {r['beta2']:g}: {_num(r['mean'])} [{_num(r['lo'])}, {_num(r['hi'])}]"
                                  + (" (excludes 0)" if r["excludes_zero"] else "") for r in diffs) + "."]
    return lines


def _cost_lines(task: str, summary: Record, cost: Record | None, label: str) -> list[str]:
    """The Cost section's lines of one sweep: its own training time, and ``cost`` (its ``--cost`` measurement,
    with ``sets`` the ``--set`` arguments of its command besides the steps)."""
    c = summary["cost"]
    how = summary["config"].get("ensemble")
    lines = [f"{label}{c['cells']} cells, {c['seed_runs']} seed runs of {c['steps']} steps: {c['train_s'] / 60:.1f} "
             f"min of training ({c['wall_s'] / 60:.1f} min with the evaluations), {c['ms_per_seed_step']:g} ms per "
             f"seed and step on {summary['threads']} torch thread(s)" + _machines(c.get("cpus"))
             + ("" if how is None else ", each cell's seeds " + ("as one ensemble" if how else "one after another"))
             + "."]
    if cost is not None:
        ms = cost["ms_per_seed_step"]
        faster = "slower" if cost["ensemble_over_separate"] > 1 else "faster"
        lines += ["", f"`adoptim sweep {task} --cost --threads {cost['threads']}{cost.get('sets', '')} --set "
                  f"steps={cost['steps']}`: one cell's {cost['seeds']} seeds ("
                  + (f"hidden {cost['hidden']}, " if cost.get("hidden") is not None else "")
                  + f"batch {cost['batch_size']}, "
                  f"{cost['device']}) "
                  f"take {ms['ensemble']:g} ms per seed and step as one ensemble, {ms['separate']:g} ms one after "
                  f"another: the ensemble takes {cost['ensemble_over_separate']:g}x the time ({faster}). On one CPU "
                  "thread the model's matrix "
                  "products already run at the core's speed, so stacking the seeds saves only Python's per-step "
                  "overhead; the ensemble pays off where that overhead dominates (small models, GPUs)."]
    return lines


def cluster_section(task: str, sets: str = "") -> list[str]:
    """The page's "Past one machine" section: the grid over a SLURM array (``--shard``) and over Ray (``--ray``)."""
    return [
        "## Past one machine", "",
        "The cells are independent: each trains its seeds and writes one file, `runs/<cell>.json`, atomically, and "
        "a sweep skips the cells whose file is there. So a sweep spreads over machines in two ways, and either one "
        "(or a serial run) finishes a folder that another left:", "",
        "- **A SLURM array, or any N processes, with `--shard I/N`**: process I runs cells I, I+N, I+2N, ... All "
        "share one `--out`, each holding its own lock; the one that finishes the grid's last cell writes the summary.",
        "- **Ray with `--ray`**: every unfinished cell is a Ray task of one CPU and one torch thread. The `adoptim "
        "sweep` process holds the lock on `--out`, reports each cell as it finishes and writes the summary when all "
        "are done. `--ray` alone starts a local Ray on every CPU of the machine (`--ray-cpus N` for fewer); `--ray "
        "ADDRESS` joins a running cluster (`auto`, `HOST:PORT` or `ray://HOST:10001`), whose nodes need this suite "
        "installed (`pip install 'adoptim-repro[cluster]'` installs it with Ray 2.60.0). A cell that fails is named "
        "and the others are kept: rerun the same command to run it again. `--ray` does not go with `--shard`.", "",
        "The cell files are written on the machines that train them, so `--out` must be a folder that every node "
        "sees at the same path, on a shared filesystem. A Ray task first checks that it finds the driver's lock "
        "there, and fails with that message otherwise. Ray 2.60's `ray start` turns on token authentication: run "
        "the sweep with `RAY_AUTH_MODE=token` where the cluster's token is (`~/.ray/auth_token`), or start the "
        "cluster and the sweep with `RAY_AUTH_MODE=disabled` on a trusted network.", "",
        "```bash",
        "# SLURM: sbatch --array=0-7 with a job script that runs",
        f"adoptim sweep {task}{sets} --threads 1 --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT "
        f"--out /shared/results/sweep-{task}",
        "# Ray on this machine's CPUs",
        f"adoptim sweep {task}{sets} --ray --out results/sweep-{task}",
        "# Ray on a running cluster (ray start --head on one node, ray start --address=HEAD:6379 on the others)",
        f"adoptim sweep {task}{sets} --ray auto --out /shared/results/sweep-{task}", "```",
    ]


def doc_page(task: str, setting: str, summary: Record, cost: Record | None, figures: str,
             long: Record | None = None, page: str = "docs/reproduction/sweeps.md", sets: str = "",
             other: Record | None = None, other_command: str | None = None,
             other_cost: Record | None = None) -> str:
    """The documentation page of a finished sweep, every number from ``summary`` (and ``cost``, and a
    longer sweep ``long`` over some of its cells, and ``other``, the same task's sweep at another batch
    size, made by ``other_command``); ``setting`` describes the task's model and metric, ``sets`` the
    ``--set`` arguments that made the sweep (none: the defaults)."""
    cfg, c = summary["config"], summary["cost"]
    grid = (f"beta2 in {{{', '.join(f'{b:g}' for b in cfg['beta2s'])}}} x lr in "
            f"{{{', '.join(f'{lr:g}' for lr in cfg['lrs'])}}} x {', '.join(cfg['optimizers'])}, "
            f"{cfg['seeds']} seeds per cell")
    lines = [
        f"# Sweeps over beta2 and the learning rate: {task}", "",
        "<!-- Generated by `adoptim sweep " + task + " --doc` from the sweep's summary.json: edit sweep_report.py, not "
        "this page. -->", "",
        "**Claim (the paper's title).** ADOPT converges with any beta2, where Adam needs a problem-dependent one. "
        "On a real task: over a grid of beta2 and learning rates, ADOPT's final loss depends less on beta2 and on "
        "the learning rate than Adam's and AMSGrad's.", "",
        f"**Setting.** {task}: {setting}. {cfg['steps']} steps per cell: "
        f"{c['shorter_by']:g}x shorter than the experiment's "
        f"{c['default_steps']:,}. Grid: {grid}. Each optimizer keeps its own beta1 and eps (ADOPT eps 1e-6, "
        "clipped). Seed s has the same initialisation and batches in every cell, so cells compare paired by seed. "
        "A seed whose training loss became NaN or inf is counted as diverged, and in the comparisons its loss "
        "is the loss at initialisation (Wortsman et al.'s min(loss, loss at init)). Run with "
        f"{summary['threads']} torch thread(s).", "",
        *([f"**This page is from `--quick`**: {QUICK_NOTE}", ""] if summary["preset"] == "quick" else []),
        "## Command", "", "```bash",
        f"adoptim sweep {task} --threads 1{sets}           # the grid above",
        f"adoptim sweep {task} --quick --threads 1   # a small grid: proves the code path, not the claim",
        f"adoptim sweep {task} --cost --threads 1    # one cell's seeds as one ensemble against one after another",
        "# n machines or SLURM array tasks sharing one folder: each runs every n-th cell",
        f"adoptim sweep {task}{sets} --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --out results/sweep-{task}",
        f"adoptim sweep {task}{sets} --doc {page}   # this page, from the finished sweep", "```", "",
        "## Result", "",
        f"![{task}: test loss over (beta2, lr), one panel per optimizer on one colour scale; hatched cells had a "
        f"diverged seed]({figures}/sweep_{task}_heatmaps.png)", "",
        f"![{task}: test loss at each optimizer's best lr, and the lr sensitivity, against beta2, 95% intervals]"
        f"({figures}/sweep_{task}_beta2.png)", "",
        f"The figures are `sweep_{task}_heatmaps.png` from the output folder of `adoptim sweep {task}` (written "
        f"there as `heatmaps.png`) and `sweep_{task}_beta2.png` from the output folder of `adoptim sweep {task}` "
        "(`beta2.png`), copied to `docs/figures/` by `--doc`.", "",
        "### Where the claim holds here, and where it does not", "",
        "Each optimizer's *best lr* is the one whose loss, min(test loss, loss at init), averaged over the beta2 grid "
        "and the seeds is lowest; one lr per optimizer, so the loss against beta2 at that lr shows what changing "
        "beta2 alone does.", "",
        *[f"- {v}" for v in _verdicts(summary)], "",
        "### ADOPT minus Adam, paired by seed (negative: ADOPT better)", "",
        "| beta2 | metric | mean | 95% interval | excludes 0 |", "|---|---|---|---|---|",
        *[f"| {r['beta2']:g} | {r['metric']} | {_num(r['mean'])} | [{_num(r['lo'])}, {_num(r['hi'])}] | "
          f"{'yes' if r['excludes_zero'] else 'no'} |" for r in summary["paired"]], "",
        "### Test loss at each optimizer's best lr (mean, 95% interval)", "",
        "| beta2 | " + " | ".join(f"{o} (lr {lr:g})" for o, lr in summary["best_lr"].items()) + " |",
        "|---|" + "---|" * len(summary["best_lr"]),
    ]
    for b in cfg["beta2s"]:
        row = {r["optimizer"]: r for r in summary["at_best_lr"] if r["beta2"] == b}
        lines.append(f"| {b:g} | " + " | ".join(f"{_num(row[o]['mean'])} ± {_num(row[o]['ci95'], 2)}"
                                                 for o in summary["best_lr"]) + " |")
    lines += ["", "### LR sensitivity (Wortsman et al. 2023; mean, 95% interval over seeds)", "",
              "Per seed: the mean over the lr grid of min(loss(lr), loss at init), minus the best of them. "
              "0 means every lr of the grid is as good as the best one.", "",
              "| beta2 | " + " | ".join(summary["best_lr"]) + " |", "|---|" + "---|" * len(summary["best_lr"])]
    for b in cfg["beta2s"]:
        row = {r["optimizer"]: r for r in summary["sensitivity"] if r["beta2"] == b}
        lines.append(f"| {b:g} | " + " | ".join(f"{_num(row[o]['mean'])} ± {_num(row[o]['ci95'], 2)}"
                                                 for o in summary["best_lr"]) + " |")
    div = [r for r in summary["final"] if r["diverged"]]
    lines += ["", "### Diverged cells", ""]
    lines += ([f"- {r['optimizer']} beta2 {r['beta2']:g} lr {r['lr']:g}: {r['diverged']} of {r['seeds']} seeds, "
               f"first at step {r['diverged_step']}" for r in div] or ["None: every seed of every cell stayed finite."])
    if long is not None:
        lines += _length_check(summary, long)
    if "spikes" in summary:
        lines += _spike_section(summary, other, other_command)
    lines += ["", *cluster_section(task, sets)]  # the Cost section stays the page's last
    lines += ["", "## Cost", "", *_cost_lines(task, summary, cost, "")]
    if other is not None:
        lines += ["", *_cost_lines(task, other, other_cost, f"The batch {other['config']['batch_size']} sweep: ")]
    return "\n".join(lines) + "\n"
