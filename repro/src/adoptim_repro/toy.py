"""The paper's stochastic convex toy problem (ADOPT, Section 3 / Figure 1).

Claim: on f(x) = x over [-1, 1], with the oracle returning k^2 x with probability 1/k and -k x
otherwise (mean gradient 1, so the optimum is x = -1), Adam with a small beta2 drifts to the wrong end
(x = +1) and AMSGrad moves slowly, while ADOPT reaches the optimum for every beta2.

Run: ``adoptim toy`` (2e6 steps x 1000 runs x 6 settings x 4 optimizers; ``adoptim toy --quick`` proves
the code path, not the claim).

All runs of all (k, beta2) settings of one optimizer are one tensor of shape ``(len(ks), len(beta2s),
runs)`` updated by a few fused ops per step (:mod:`.toy_rules`). Draws are common to all optimizers
(seeded by seed and chunk), so every optimizer sees the same gradient sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from . import report, toy_rules
from .optimizers import OptimSpec
from .runner import Experiment, RunContext, RunResult, Unit, seed_units

TOY_OPTIMIZERS = ("adam", "amsgrad", "adopt", "adopt-noclip")
OPTIMUM = -1.0


def _specs() -> dict[str, OptimSpec]:
    # lr is the schedule's base: lr_t = lr / sqrt(1 + lr_decay * t); beta2 comes from the grid.
    adam = OptimSpec(lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    adopt = OptimSpec(lr=0.01, betas=(0.9, 0.999), eps=1e-6)
    return {"adam": adam, "amsgrad": adam, "adopt": adopt, "adopt-noclip": adopt}


@dataclass
class ToyConfig:
    """The toy problem. ``optim[NAME]`` gives each optimizer's base lr, beta1 and eps (beta2: ``beta2s``)."""

    OPTIMIZERS: ClassVar[tuple[str, ...]] = TOY_OPTIMIZERS  # the update rules written out in toy_rules

    steps: int = 2_000_000
    """gradient calls per run (the paper's 2e6)"""
    runs: int = 1000
    """independent runs per (k, beta2) setting; quartiles of x are over them"""
    seeds: int = 1
    """seeds 0..N-1 are run (each draws its own gradient sequences)"""
    ks: tuple[int, ...] = (10, 50)
    """values of k: the oracle returns k^2 with probability 1/k, else -k"""
    beta2s: tuple[float, ...] = (0.1, 0.5, 0.999)
    """values of beta2, one panel each"""
    lr_decay: float = 0.01
    """the step size is lr / sqrt(1 + lr_decay * t)"""
    clip_exponent: float = 0.25
    """ADOPT's clip bound t^clip_exponent (adopt; adopt-noclip has none)"""
    optimizers: tuple[str, ...] = TOY_OPTIMIZERS
    """the optimizers compared, by name (adam, amsgrad, adopt, adopt-noclip)"""
    optim: dict[str, OptimSpec] = field(default_factory=_specs)
    """each optimizer's base lr, beta1 (betas[0]) and eps, as NAME.lr=...; beta2 comes from beta2s"""
    log_points: int = 200
    """how many times the quartiles of x are recorded, evenly spaced"""
    chunk: int = 2048
    """gradient calls drawn at once (the draws of a chunk are seeded by seed and chunk index)"""
    dtype: str = "float32"
    """float32 or float64: the precision of x and the optimizer states"""
    compile: bool = True
    """fuse blocks of 32 calls with torch.compile (falls back to eager if compiling fails)"""

    def validate(self) -> None:
        for key in ("steps", "runs", "log_points", "chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if not self.ks or any(k < 2 for k in self.ks):
            raise ValueError(f"config key 'ks' needs values >= 2 (the oracle draws with probability 1/k), "
                             f"got {self.ks}")
        if not self.beta2s or any(not 0 <= b < 1 for b in self.beta2s):
            raise ValueError(f"config key 'beta2s' needs values in [0, 1), got {self.beta2s}")
        if self.lr_decay < 0 or self.clip_exponent < 0:
            raise ValueError("config keys 'lr_decay' and 'clip_exponent' must be >= 0")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"config key 'dtype' must be float32 or float64, got {self.dtype!r}")


def draws(cfg: ToyConfig, seed: int, chunk: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of chunk ``chunk``: shape ``(length, len(ks), 1, runs)``, and their squares.

    Each is k^2 with probability 1/k and -k otherwise (for f(x) = x the gradient does not depend on x).
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
    u = torch.rand(length, len(cfg.ks), 1, cfg.runs, generator=gen, dtype=torch.float64)
    k = torch.tensor(cfg.ks, dtype=torch.float64).view(1, -1, 1, 1)
    g = torch.where(u < 1 / k, k * k, -k).to(getattr(torch, cfg.dtype))
    return g, g * g


BLOCK = 32  # calls fused into one compiled loop


class _Runs:
    """One optimizer's state for every run and setting: tensors of shape ``(len(ks), len(beta2s), runs)``."""

    def __init__(self, cfg: ToyConfig, name: str, device: torch.device | str = "cpu") -> None:
        self.cfg, self.name, self.spec = cfg, name, cfg.optim[name]
        self.adam = name in ("adam", "amsgrad")
        dtype = getattr(torch, cfg.dtype)
        shape = (len(cfg.ks), len(cfg.beta2s), cfg.runs)
        self.x, self.m, self.v, self.vmax = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(4))
        self.beta2 = torch.tensor(cfg.beta2s, dtype=torch.float64).view(1, -1, 1)
        self.w2 = (1 - self.beta2).to(device, dtype)
        rules = (toy_rules.adam_steps, toy_rules.adopt_steps)
        eager = rules[0] if self.adam else rules[1]
        self.eager, self.fast = eager, toy_rules.compiled(eager) if cfg.compile else eager
        self.block = BLOCK

    def state(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "m": self.m, "v": self.v, "vmax": self.vmax}

    def load(self, s: dict[str, torch.Tensor]) -> None:
        self.x, self.m, self.v, self.vmax = s["x"], s["m"], s["v"], s["vmax"]

    def advance(self, g: torch.Tensor, g2: torch.Tensor, first: int) -> None:
        """Apply the calls ``first .. first + len(g) - 1`` (0-based gradient calls) to every run."""
        if not self.adam and first == 0:  # ADOPT's first call only sets v = g^2
            self.v = g2[0].to(self.v.device).expand_as(self.v).clone()
            g, g2, first = g[1:], g2[1:], 1
        n = g.shape[0]
        t = torch.arange(first, first + n, dtype=torch.float64)
        lr = (self.spec.lr / torch.sqrt(1 + self.cfg.lr_decay * t)).view(-1, 1, 1, 1)
        dtype, dev = self.x.dtype, self.x.device
        g, g2 = g.to(dev), g2.to(dev)
        if self.adam:
            step_size = (lr / (1 - self.spec.betas[0] ** (t + 1)).view(-1, 1, 1, 1)).to(dev, dtype)
            sqrt_c2 = torch.sqrt(1 - self.beta2.unsqueeze(0) ** (t + 1).view(-1, 1, 1, 1)).to(dev, dtype)
            per_call: tuple[torch.Tensor, ...] = (step_size, sqrt_c2)
        else:
            per_call = (lr.to(dev, dtype), (t**self.cfg.clip_exponent).view(-1, 1, 1, 1).to(dev, dtype))
        for a in range(0, n, self.block):
            b = min(a + self.block, n)
            fn = self.fast if b - a == self.block else self.eager
            args = (g[a:b], g2[a:b], *(p[a:b] for p in per_call), self.w2, self.spec.betas[0], self.spec.eps)
            if self.adam:
                self.x, self.m, self.v, self.vmax = fn(self.x, self.m, self.v, self.vmax, *args,
                                                       self.name == "amsgrad")
            else:
                self.x, self.m, self.v = fn(self.x, self.m, self.v, *args, self.name == "adopt")


def log_steps(cfg: ToyConfig) -> list[int]:
    """Gradient-call counts after which quantiles of x are recorded (increasing, the last is ``steps``)."""
    n = min(cfg.log_points, cfg.steps)
    return sorted({round(cfg.steps * (i + 1) / n) for i in range(n)})


def _quartiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double().cpu(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=-1)


def run(cfg: ToyConfig, unit: Unit, ctx: RunContext) -> list[dict[str, Any]]:
    runs = _Runs(cfg, unit.optimizer, ctx.device)
    done, hit = 0, {}
    saved = ctx.resume()
    if saved is not None:
        runs.load({k: v.to(ctx.device) for k, v in saved["runs"].items()})
        done, hit = saved["done"], saved["hit"]
    logs = log_steps(cfg)
    ctx.progress(cfg.steps, done)
    while done < cfg.steps:
        # Draws come in chunks seeded by (seed, chunk index) and checkpoints fall on chunk ends,
        # so a resumed run sees exactly the draws it would have seen.
        c = done // cfg.chunk
        end = min((c + 1) * cfg.chunk, cfg.steps)
        g, g2 = draws(cfg, unit.seed, c, end - c * cfg.chunk)
        while done < end:
            stop = min(end, next(s for s in logs if s > done))
            runs.advance(g[done - c * cfg.chunk:stop - c * cfg.chunk],
                         g2[done - c * cfg.chunk:stop - c * cfg.chunk], done)
            done = stop
            if done in logs:
                q = _quartiles(runs.x)  # (3, K, B)
                for a, b in zip(*torch.nonzero(q[1] <= OPTIMUM + 0.01, as_tuple=True), strict=True):
                    hit.setdefault(f"{cfg.ks[a]}/{cfg.beta2s[b]}", done)
                ctx.log(done, q25=q[0].tolist(), median=q[1].tolist(), q75=q[2].tolist())
                ctx.update(done, median=float(q[1].mean()))
            ctx.update(done)
        ctx.checkpoint({"runs": {k: v.cpu() for k, v in runs.state().items()}, "done": done, "hit": hit})
    x, q = runs.x.cpu(), _quartiles(runs.x)
    rows = []
    for a, k in enumerate(cfg.ks):
        for b, beta2 in enumerate(cfg.beta2s):
            rows.append({"k": k, "beta2": beta2, "median": float(q[1, a, b]), "q25": float(q[0, a, b]),
                         "q75": float(q[2, a, b]),
                         "at_optimum": float((x[a, b] <= OPTIMUM + 0.01).double().mean()),
                         "median_hit_step": hit.get(f"{k}/{beta2}")})
    return rows


def summarize(cfg: ToyConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, k, beta2): quantiles of the final x (means over seeds if several), the
    percentage of runs within 0.01 of the optimum, the step by which the median got there ("never" if it
    did not, in every seed) and the number of runs."""
    out = []
    for (name, k, beta2), rows in report.group(records, "optimizer", "k", "beta2").items():
        row: dict[str, Any] = {"optimizer": name, "k": k, "beta2": beta2}
        for key in ("median", "q25", "q75"):
            row[key] = sum(r[key] for r in rows) / len(rows)
        row["at_optimum_%"] = 100 * sum(r["at_optimum"] for r in rows) / len(rows)
        hits = [r["median_hit_step"] for r in rows]
        row["median_hit_step"] = "never" if None in hits else max(hits)
        row["runs"] = cfg.runs * len(rows)
        out.append(row)
    return out


def plot(cfg: ToyConfig, results: list[RunResult], out: Path) -> None:
    """Median x (quartile band) over steps, one panel per (k, beta2), seed 0."""
    fig, axes = report.figure(len(cfg.ks), len(cfg.beta2s), size=(3.2, 2.4))
    for res in results:
        if res.unit.seed != 0 or not res.history:
            continue
        steps = [h["step"] for h in res.history]
        for a, k in enumerate(cfg.ks):
            for b, beta2 in enumerate(cfg.beta2s):
                ax = axes[a][b]
                med = [h["median"][a][b] for h in res.history]
                lo, hi = [h["q25"][a][b] for h in res.history], [h["q75"][a][b] for h in res.history]
                (line,) = ax.plot(steps, med, label=res.unit.optimizer, lw=1.2)
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
                ax.set_title(f"k = {k}, $\\beta_2$ = {beta2}", fontsize=9)
                ax.set_ylim(-1.05, 1.05)
                ax.axhline(OPTIMUM, color="k", lw=0.5, ls=":")
    for row in axes:
        for ax in row:
            ax.set_xlabel("gradient calls")
        row[0].set_ylabel("x, median and IQR of runs\n(dimensionless)")
    axes[0][0].legend(fontsize=7, loc="center right")
    report.save(fig, out / "toy.png")


EXPERIMENT = Experiment(
    name="toy",
    summary="stochastic convex problem f(x)=x, k in {10,50}: Adam fails for small beta2, ADOPT converges",
    paper_scale="the default is the paper's setting: 2e6 steps x 1000 runs per (k, beta2)",
    config=ToyConfig,
    quick={"steps": 100_000, "runs": 500, "compile": False},
    units=seed_units,
    run=run,
    summarize=summarize,
    plot=plot,
)
