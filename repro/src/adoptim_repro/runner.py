"""The shared runner: turns an :class:`Experiment` into resumable runs, metrics, a summary and plots.

How to add an experiment (say ``foo``)
======================================

1. Create ``repro/src/adoptim_repro/foo.py``; its first docstring states the paper's claim being tested.
   Import heavy optional packages inside functions, so ``adoptim list`` works without them.
   The registry (:mod:`adoptim_repro.registry`) imports ``adoptim_repro.<name>`` for each
   name in ``EXPERIMENT_MODULES`` (gpt, llama, cifar10, imagenet, rl are already listed) and reads its
   module-level ``EXPERIMENT``.
2. The config: a ``@dataclass`` whose defaults follow the paper (the *default* run must finish within
   30 minutes on a 2-core CPU; scale it down there and say so). Required fields: ``seeds: int``.
   Optimizers: ``optimizers: tuple[str, ...]`` (names from :data:`~.optimizers.OPTIMIZERS`) and
   ``optim: dict[str, OptimSpec] = field(default_factory=default_specs)`` with each one's lr/betas/
   eps/weight_decay (``--set adopt.lr=3e-3``). Allowed field types: int, float, bool, str, ``X | None``,
   ``tuple[X, ...]``. Add ``validate(self)`` raising ``ValueError("key 'steps' must be >= 1, got 0")``
   for impossible values: the CLI prints it as one line before anything runs.
3. ``quick``: a dict of overrides (``{"steps": 200}``) that makes ``--quick`` finish within 2 minutes
   on a 2-core CPU (all seeds and optimizers together).
4. ``units(config) -> list[Unit]``: the resumable pieces of work (``seed_units`` gives one per seed
   and optimizer), normally one
   ``Unit(optimizer, seed, setting)`` per (optimizer, seed, setting); ``setting`` is a tuple of
   ``(key, value)`` pairs for a grid (``(("k", 10),)``), empty otherwise. A unit whose result file
   exists is skipped on rerun; nothing else of it is repeated.
5. ``run(config, unit, ctx) -> dict | list[dict]``: trains one unit and returns its final metrics
   (one record, or several rows for a unit that vectorises a grid). The runner adds the unit's
   ``optimizer``, ``seed`` and setting keys to each record unless present, and writes
   ``runs/<key>.json`` atomically. Inside ``run``, use the :class:`RunContext`:

   - ``state = ctx.resume()`` at the start: ``None``, or the dict last passed to ``ctx.checkpoint``
     (tensors on CPU; load them with ``model.load_state_dict(...)`` etc.). It also truncates the metrics
     file to what was logged up to that checkpoint, so no line is repeated.
   - ``ctx.progress(total, initial)`` once, then ``ctx.log(step, **metrics)`` to append a JSON line to
     ``metrics/<key>.jsonl`` and move the progress bar (showing the metrics); ``ctx.update(step,
     **metrics)`` moves the bar without recording.
   - ``ctx.checkpoint(state)`` often (e.g. every few hundred steps): it saves only when
     ``ctx.checkpoint_every`` seconds have passed (``force=True`` saves now), atomically, so a run
     killed at any moment resumes from its last checkpoint. Put everything that determines the rest of
     the run into ``state``: step, model and optimizer ``state_dict()``, RNG states. Prefer data order
     and noise drawn from generators seeded by ``(seed, step or epoch)``: then they need no saving.
   - Distributed: ``ctx.rank``, ``ctx.world_size`` (split the global batch by them), ``ctx.device``,
     ``ctx.is_main``. Only rank 0 writes files and shows progress; every rank runs every unit.
6. ``summarize(config, records) -> list[dict]``: the ``final`` rows of ``summary.json`` (each with
   ``optimizer``), e.g. mean and 95% interval over seeds (see :mod:`.report`). ``summary.md`` is the
   same rows as a Markdown table.
7. ``plot(config, results, out)`` (optional): write PNGs into ``out`` with matplotlib (use
   :func:`.report.figure`); ``results`` are :class:`RunResult` s, each with its unit, records and the
   metric ``history`` read back from its JSON lines.
8. ``summary``: the one line ``adoptim list`` prints; ``paper_scale``: what the paper's full setting
   needs (e.g. ``"paper: 10,000 iters x 3 seeds, ~12 min on 2 CPU cores"`` or ``"8 A100 x 2 days"``).

Output directory (``--out``): ``config.json`` (experiment, resolved config; a rerun with a different
config is refused, except for ``seeds``, which adds or leaves out units), ``runs/``, ``metrics/``,
``checkpoints/`` (removed when a unit finishes), ``summary.json`` = ``{"experiment", "config",
"final": [...]}``, ``summary.md``, ``*.png``.

Launched as ``torchrun --nproc_per_node N -m adoptim_repro foo`` (``WORLD_SIZE`` > 1) the runner initialises
``torch.distributed`` (gloo on CPU, nccl on CUDA) and sets each rank's CUDA device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _io
from .config import ConfigError, to_dict

Record = dict[str, Any]


@dataclass(frozen=True)
class Unit:
    """One resumable piece of work: an optimizer, a seed and a point of the experiment's grid."""

    optimizer: str
    seed: int
    setting: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """A file-name-safe identifier, e.g. ``adam-s0`` or, with a setting ``(("k", 10),)``, ``adam-s0-k10``."""
        parts = [self.optimizer, f"s{self.seed}"] + [f"{k}{v}" for k, v in self.setting]
        return "-".join(parts).replace("/", "_").replace(" ", "")

    def fields(self) -> Record:
        return {"optimizer": self.optimizer, "seed": self.seed, **dict(self.setting)}


def seed_units(cfg: Any) -> list[Unit]:
    """The usual ``units``: one unit per (seed, optimizer) of a config with ``seeds`` and ``optimizers``."""
    return [Unit(name, seed) for seed in range(cfg.seeds) for name in cfg.optimizers]


@dataclass(frozen=True)
class Experiment:
    """What the runner needs to know about an experiment (see the module docstring)."""

    name: str
    summary: str
    paper_scale: str
    config: type
    quick: Mapping[str, Any]
    units: Callable[[Any], list[Unit]]
    run: Callable[[Any, Unit, RunContext], Record | list[Record]]
    summarize: Callable[[Any, list[Record]], list[Record]]
    plot: Callable[[Any, list[RunResult], Path], None] | None = None


@dataclass
class RunResult:
    """A finished unit: its records and the metrics history it logged."""

    unit: Unit
    records: list[Record]
    history: list[Record] = field(default_factory=list)


@dataclass
class Dist:
    """The process's place in a distributed launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> Dist:
    """Join the process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world_size=world)


class RunContext:
    """What a unit's ``run`` function uses to log, show progress, checkpoint and resume."""

    def __init__(self, out: Path, unit: Unit, device: torch.device, dist: Dist,
                 checkpoint_every: float = 60.0, position: str = "") -> None:
        self.out = out
        self.unit = unit
        self.device = device
        self.rank = dist.rank
        self.world_size = dist.world_size
        self.is_main = dist.is_main
        self.checkpoint_every = checkpoint_every
        self.metrics_path = out / "metrics" / f"{unit.key}.jsonl"
        self.checkpoint_path = out / "checkpoints" / f"{unit.key}.pt"
        self._position = position
        self._bar: Any = None
        self._last_save = time.monotonic()
        self._dist = dist

    # -- resume and checkpoint -------------------------------------------------------------------
    def resume(self) -> dict[str, Any] | None:
        """The state of the last checkpoint of this unit, or ``None`` to start from scratch."""
        saved = None
        if self.checkpoint_path.exists():
            try:
                saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
                if not isinstance(saved, dict) or not {"metrics_offset", "state"} <= set(saved):
                    raise ValueError("not a checkpoint of this runner")
            except Exception as e:  # written atomically, so only damage from outside gets here
                raise ConfigError(
                    f"checkpoint {self.checkpoint_path} cannot be read ({type(e).__name__}: {e}); delete it to "
                    "restart this unit from scratch") from None
        if self.is_main:
            # Metrics logged after the checkpoint will be logged again by the resumed run: drop them.
            offset = saved["metrics_offset"] if saved else 0
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a+b") as f:
                f.truncate(offset)
        self._dist.barrier()
        return saved["state"] if saved else None

    def checkpoint(self, state: dict[str, Any], force: bool = False) -> bool:
        """Save ``state`` atomically if ``checkpoint_every`` seconds have passed (or ``force``)."""
        if not force and time.monotonic() - self._last_save < self.checkpoint_every:
            return False
        self._last_save = time.monotonic()
        if self.is_main:
            offset = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            _io.write_torch(self.checkpoint_path, {"metrics_offset": offset, "state": state})
        return True

    # -- progress and metrics --------------------------------------------------------------------
    def progress(self, total: int, initial: int = 0) -> None:
        """Show a progress bar for ``total`` steps (rank 0 only)."""
        if not self.is_main:
            return
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total, initial=initial, desc=f"{self._position}{self.unit.key}",
                         dynamic_ncols=True, leave=False, file=sys.stderr, mininterval=1.0)

    def update(self, step: int, **metrics: Any) -> None:
        """Move the progress bar to ``step`` and show ``metrics`` beside it."""
        if self._bar is None:
            return
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        if metrics:
            self._bar.set_postfix({k: _short(v) for k, v in metrics.items()}, refresh=False)

    def log(self, step: int, **metrics: Any) -> None:
        """Record ``metrics`` at ``step`` as one JSON line and show them on the progress bar."""
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.update(step, **metrics)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _short(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def _config_meta(exp: Experiment, cfg: Any) -> Record:
    return {"experiment": exp.name, "config": to_dict(cfg)}


def _read_result(path: Path, what: str, check: Callable[[Any], bool]) -> Any:
    """A results file of ``out`` parsed, or a :class:`ConfigError` naming it (results are written
    atomically, so only damage from outside makes one unreadable)."""
    try:
        value = _io.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); {what}") from None
    if not check(value):
        raise ConfigError(f"{path} does not hold what this runner writes there; {what}")
    return value


def _check_writable(out: Path) -> None:
    """``out`` is (or can be made) a directory this process can write into, or a :class:`ConfigError`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out} cannot hold results: {e.strerror or e}") from None


def _remove_stale_temporaries(out: Path) -> None:
    # A kill during an atomic write leaves its temporary file (never read: the target is renamed into
    # place only when complete). Checkpoints are large, so they are removed before a run goes on.
    for tmp in out.glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)


def _check_out(out: Path, meta: Record) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    old = _read_result(path, "remove it (and the results beside it) or use another --out",
                       lambda v: isinstance(v, dict) and isinstance(v.get("config"), dict))
    if old.get("experiment") != meta["experiment"]:
        raise ConfigError(f"{out} holds results of experiment {old.get('experiment')!r}; use another --out")
    if not any(out.glob("runs/*.json")) and not any(out.glob("checkpoints/*.pt")):
        return  # nothing finished or saved under the old config (it failed early): the new one may start
    new_cfg = json.loads(json.dumps(meta["config"]))
    for key in sorted(set(old["config"]) | set(new_cfg)):
        # More (or fewer) seeds only add (or leave out) units: the finished ones stay valid.
        if key != "seeds" and old["config"].get(key) != new_cfg.get(key):
            raise ConfigError(
                f"{out} was made with {key}={old['config'].get(key)!r}, not {new_cfg.get(key)!r}; "
                "rerun with the same config to resume, or use another --out")


def run_experiment(exp: Experiment, cfg: Any, out: Path, device: str = "cpu",
                   checkpoint_every: float = 60.0, log: Callable[[str], None] | None = None) -> Record:
    """Run every unfinished unit of ``exp`` under ``cfg`` into ``out``; return the summary dict."""
    out = Path(out)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dist = init_distributed(device)
    meta = _config_meta(exp, cfg)
    units = exp.units(cfg)
    keys = [u.key for u in units]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # e.g. --set optimizers=adam,adam: the same run twice
        raise ConfigError(f"the config asks for the same run twice: {', '.join(repeated)}; list each value once")
    if dist.is_main:
        _check_writable(out)
        _check_out(out, meta)
        _remove_stale_temporaries(out)
        _io.write_json(out / "config.json", meta)
    dist.barrier()
    dev = torch.device(device)
    results: list[RunResult] = []
    for i, unit in enumerate(units, 1):
        path = out / "runs" / f"{unit.key}.json"
        if path.exists():
            records = _read_result(path, "delete it to run this unit again",
                                   lambda v: isinstance(v, dict) and isinstance(v.get("records"), list))["records"]
            if dist.is_main:  # left behind when a kill came between the result and its cleanup
                (out / "checkpoints" / f"{unit.key}.pt").unlink(missing_ok=True)
        else:
            if dist.is_main:
                say(f"[{exp.name} {i}/{len(units)}] {unit.key}")
            ctx = RunContext(out, unit, dev, dist, checkpoint_every, position=f"{i}/{len(units)} ")
            start = time.perf_counter()
            try:
                got = exp.run(cfg, unit, ctx)
            finally:
                ctx.close()
            records = [{**unit.fields(), **r} for r in (got if isinstance(got, list) else [got])]
            if dist.is_main:
                _io.write_json(path, {"unit": dataclasses.asdict(unit), "records": records,
                                      "wall_s": round(time.perf_counter() - start, 3)})
                ctx.checkpoint_path.unlink(missing_ok=True)
            dist.barrier()
        metrics = out / "metrics" / f"{unit.key}.jsonl"
        try:
            history = list(_io.read_jsonl(metrics))
        except ValueError as e:
            raise ConfigError(f"{metrics} has a line that is not JSON ({e}); delete it and {path} to run this "
                              "unit again") from None
        results.append(RunResult(unit, records, history))
    summary = {**meta, "final": exp.summarize(cfg, [r for res in results for r in res.records])}
    if dist.is_main:
        from . import report

        _io.write_json(out / "summary.json", summary)
        _io.write_text(out / "summary.md", report.markdown(exp.name, summary["final"]))
        if exp.plot is not None:
            exp.plot(cfg, results, out)
        say(f"[{exp.name}] results in {out}: summary.md, summary.json, plots, metrics/")
    dist.barrier()
    return summary
