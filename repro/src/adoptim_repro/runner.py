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
   - Distributed: ``ctx.dist`` (:class:`~.distributed.Dist`: ``slice(n)`` of the global batch,
     ``all_sum``, ``wrap(model)`` in DistributedDataParallel), also as ``ctx.rank``, ``ctx.world_size``,
     ``ctx.device``, ``ctx.is_main``. Only rank 0 writes files and shows progress; every rank runs every unit.
   - A learning-rate schedule: :class:`~.schedule.Schedule` (put its ``state_dict()`` in the checkpoint).
6. ``summarize(config, records) -> list[dict]``: the ``final`` rows of ``summary.json`` (each with
   ``optimizer``), e.g. mean and 95% interval over seeds (:func:`.report.stats`; spreads of one seed are
   ``None``, shown as n/a); accuracies in percent. ``summary.md`` is the
   same rows as a Markdown table.
7. ``plot(config, results, out)`` (optional): write PNGs into ``out`` with matplotlib (use
   :func:`.report.figure`); ``results`` are :class:`RunResult` s, each with its unit, records and the
   metric ``history`` read back from its JSON lines.
8. ``summary``: the one line ``adoptim list`` prints; ``paper_scale``: what the paper's full setting
   needs (e.g. ``"8 A100 x 2 days"``). Its measured run time goes in :data:`.registry.RUN_TIMES` (the
   one place run times are kept), with the machine and date of the measurement.
9. ``requires`` (optional): ``(module, how to install it)`` pairs; ``adoptim list`` shows the
   experiment as unavailable, and a run is refused before anything is written, while one is missing.
   ``preflight(config)`` (optional): every data and path check that can run before the first unit
   (read the data file, find the folders); it raises ``ValueError`` with a one-line message.

Output directory (``--out``): ``.lock`` (while a run holds it: owner pid and host), ``config.json``
(experiment, resolved config, preset, threads; a rerun with a different config is refused, except for
``seeds``, which adds or leaves out units; ``--fresh`` starts over), ``runs/``, ``metrics/``,
``checkpoints/`` (removed when a unit finishes), ``tensorboard/`` (with ``--tensorboard``),
``summary.json`` = ``{"experiment", "config", ..., "final": [...]}``, ``summary.md``, ``*.png``.

Launched as ``torchrun --nproc_per_node N -m adoptim_repro foo`` (``WORLD_SIZE`` > 1) the runner initialises
``torch.distributed`` (gloo on CPU, nccl on CUDA) and sets each rank's CUDA device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _io
from .config import ConfigError, to_dict
from .distributed import Dist, init_distributed
from .outdir import (
    acquire_lock,
    check_out,
    check_writable,
    read_result,
    release_lock,
    remove_stale_temporaries,
    start_fresh,
)

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
    requires: tuple[tuple[str, str], ...] = ()
    preflight: Callable[[Any], None] | None = None


@dataclass
class RunResult:
    """A finished unit: its records and the metrics history it logged."""

    unit: Unit
    records: list[Record]
    history: list[Record] = field(default_factory=list)


class RunContext:
    """What a unit's ``run`` function uses to log, show progress, checkpoint and resume."""

    def __init__(self, out: Path, unit: Unit, dist: Dist, checkpoint_every: float = 60.0, position: str = "",
                 tensorboard: bool = False, say: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.unit = unit
        self.dist = dist
        self.device = dist.device
        self.rank = dist.rank
        self.world_size = dist.world_size
        self.is_main = dist.is_main
        self.checkpoint_every = checkpoint_every
        self.metrics_path = out / "metrics" / f"{unit.key}.jsonl"
        self.checkpoint_path = out / "checkpoints" / f"{unit.key}.pt"
        self._position = position
        self._bar: Any = None
        self._last_save = time.monotonic()
        self._step = 0  # the last step logged or shown, saved with each checkpoint
        self._tensorboard = tensorboard and dist.is_main
        self._writer: Any = None
        self._purge_step: int | None = None
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))

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
            if saved:
                self._step = int(saved.get("step", 0))
                at = f" at step {self._step}" if "step" in saved else ""
                self._say(f"  resuming {self.unit.key} from its checkpoint{at}, saved "
                          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.checkpoint_path.stat().st_mtime))}")
            # TensorBoard drops the events the resumed run will write again.
            self._purge_step = self._step + 1 if saved else None
        self.dist.barrier()
        return saved["state"] if saved else None

    def checkpoint(self, state: dict[str, Any], force: bool = False) -> bool:
        """Save ``state`` atomically if ``checkpoint_every`` seconds have passed (or ``force``)."""
        if not force and time.monotonic() - self._last_save < self.checkpoint_every:
            return False
        self._last_save = time.monotonic()
        if self.is_main:
            offset = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
            if self._writer is not None:
                self._writer.flush()
            _io.write_torch(self.checkpoint_path, {"metrics_offset": offset, "step": self._step, "state": state})
        return True

    # -- progress and metrics --------------------------------------------------------------------
    def progress(self, total: int, initial: int = 0) -> None:
        """Show a progress bar for ``total`` steps (rank 0 only); it stays on screen when the unit ends."""
        if not self.is_main:
            return
        from tqdm.auto import tqdm

        self.close()
        self._bar = tqdm(total=total, initial=initial, desc=f"{self._position}{self.unit.key}",
                         dynamic_ncols=True, leave=True, file=sys.stderr, mininterval=1.0)

    def update(self, step: int, **metrics: Any) -> None:
        """Move the progress bar to ``step`` and show ``metrics`` beside it."""
        self._step = max(self._step, step)
        if self._bar is None:
            return
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        if metrics:
            self._bar.set_postfix({k: _short(v) for k, v in metrics.items()}, refresh=False)

    def log(self, step: int, **metrics: Any) -> None:
        """Record ``metrics`` at ``step`` as one JSON line (the record of truth; also as TensorBoard
        scalars with ``--tensorboard``) and show them on the progress bar."""
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            if self._tensorboard:
                self._add_scalars(step, metrics)
        self.update(step, **metrics)

    def _add_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / "tensorboard" / self.unit.key), purge_step=self._purge_step)
        for tag, value in _scalars(metrics):
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _short(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """Finite numbers of ``metrics`` as (tag, value); nested lists become ``name/i/j`` tags."""
    out: list[tuple[str, float]] = []
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, (list, tuple)):
            out += _scalars({str(i): v for i, v in enumerate(value)}, tag + "/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out.append((tag, float(value)))
    return out


def _agree(dist: Dist, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 and raise its :class:`ConfigError` on every rank (so none waits forever)."""
    error = None
    if dist.is_main:
        try:
            check()
        except ConfigError as e:
            error = str(e)
    if dist.world_size > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)


QUICK_NOTE = ("A --quick run proves the code path, not the paper's claim: its models, data and seeds are too "
              "small for the differences between optimizers to mean anything. Run without --quick for the result.")


def run_experiment(exp: Experiment, cfg: Any, out: Path, device: str = "cpu", checkpoint_every: float = 60.0,
                   log: Callable[[str], None] | None = None, quick: bool = False, fresh: bool = False,
                   tensorboard: bool = False) -> Record:
    """Run every unfinished unit of ``exp`` under ``cfg`` into ``out``; return the summary dict.

    Every check that can fail (the config, the inputs the experiment reads, the output folder and its
    lock) runs before anything is written. ``fresh`` removes earlier results first (with the lock held).
    """
    out = Path(out)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    dist = init_distributed(device)
    units = exp.units(cfg)
    keys = [u.key for u in units]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # e.g. --set optimizers=adam,adam: the same run twice
        raise ConfigError(f"the config asks for the same run twice: {', '.join(repeated)}; list each value once")
    if exp.preflight is not None:
        try:
            exp.preflight(cfg)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
    meta: Record = {"experiment": exp.name, "config": to_dict(cfg), "preset": "quick" if quick else "default",
                    "threads": torch.get_num_threads()}
    lock: list[Path] = []

    def take_out() -> None:
        check_writable(out)
        lock.append(acquire_lock(out, say))
        try:
            if fresh:
                start_fresh(out)
            check_out(out, meta, say)
        except BaseException:
            release_lock(lock.pop())
            raise

    _agree(dist, take_out)
    try:
        return _run_units(exp, cfg, out, units, meta, dist, checkpoint_every, say, tensorboard)
    finally:
        if lock:
            release_lock(lock[0])


def _run_units(exp: Experiment, cfg: Any, out: Path, units: list[Unit], meta: Record, dist: Dist,
               checkpoint_every: float, say: Callable[[str], None], tensorboard: bool) -> Record:
    if dist.is_main:
        remove_stale_temporaries(out)
        _io.write_json(out / "config.json", meta)
        finished = [u.key for u in units if (out / "runs" / f"{u.key}.json").exists()]
        if finished and len(finished) == len(units):
            say(f"[{exp.name}] all {len(units)} units already finished in {out}: nothing to run (--fresh starts "
                "over); writing the summary and plots again")
        elif finished:
            say(f"[{exp.name}] {len(finished)} of {len(units)} units already finished in {out}, skipped: "
                f"{', '.join(finished)}")
    dist.barrier()
    results: list[RunResult] = []
    for i, unit in enumerate(units, 1):
        path = out / "runs" / f"{unit.key}.json"
        if path.exists():
            records = read_result(path, "delete it to run this unit again",
                                   lambda v: isinstance(v, dict) and isinstance(v.get("records"), list))["records"]
            if dist.is_main:  # left behind when a kill came between the result and its cleanup
                (out / "checkpoints" / f"{unit.key}.pt").unlink(missing_ok=True)
        else:
            if dist.is_main:
                say(f"[{exp.name} {i}/{len(units)}] {unit.key}")
            ctx = RunContext(out, unit, dist, checkpoint_every, position=f"{i}/{len(units)} ",
                             tensorboard=tensorboard, say=say)
            start = time.perf_counter()
            try:
                got = exp.run(cfg, unit, ctx)
            finally:
                ctx.close()
            records = [{**unit.fields(), **r} for r in (got if isinstance(got, list) else [got])]
            if dist.is_main:
                _io.write_json(path, {"unit": dataclasses.asdict(unit), "records": records,
                                      "wall_s": round(time.perf_counter() - start, 3), "threads": meta["threads"]})
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

        checkpoints = out / "checkpoints"
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # every unit finished: no checkpoint is left
        text = report.markdown(exp.name, summary["final"])
        if meta["preset"] == "quick":
            text += "\n" + QUICK_NOTE + "\n"
        _io.write_json(out / "summary.json", summary)
        _io.write_text(out / "summary.md", text)
        if exp.plot is not None:
            exp.plot(cfg, results, out)
        say(f"[{exp.name}] results in {out}: summary.md, summary.json, plots, metrics/")
        if meta["preset"] == "quick":
            say(f"[{exp.name}] {QUICK_NOTE}")
    dist.barrier()
    return summary
