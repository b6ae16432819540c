"""A sweep's cells as Ray tasks: ``adoptim sweep TASK --ray [ADDRESS]``.

Each unfinished cell is one Ray task (one CPU, one torch thread) that trains the cell and writes its
result file itself, with :func:`.sweep.run_cell`, the function the serial loop and ``--shard`` call; so a
sweep started one way is finished another. The driver (the ``adoptim sweep`` process) holds the lock on
``--out``, skips the finished cells, submits the rest, reports each as it finishes and writes the reports
when all are done. The tasks write on the node that runs them, so ``--out`` must be a folder every node
sees at the same path (a shared filesystem): each task first checks that it finds the driver's lock there.

``--ray`` alone starts a local Ray (``--ray-cpus`` CPUs, default every CPU of the machine) and stops it at
the end; ``--ray ADDRESS`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``) joins a running cluster, whose
nodes must have this package installed. In a process that has already called ``ray.init``, that
connection is used. ``pip install 'adoptim-repro[cluster]'`` installs Ray.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

LOCAL = "local"  # --ray with no ADDRESS: a new local Ray (ray.init's own name for it)
INSTALL = "pip install 'adoptim-repro[cluster]'"


class CellsFailed(RuntimeError):
    """Some cells' tasks failed; every other cell finished and is saved, so a rerun resumes."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def check_ray_args(address: str, cpus: int | None, shards: int) -> None:
    """Refuse what ``--ray`` cannot do, in one line, before anything runs (Ray missing among it)."""
    if shards > 1:
        raise ConfigError("--ray with --shard: Ray spreads the cells itself; use one or the other")
    if not address:
        raise ConfigError("--ray ADDRESS must not be empty (--ray alone starts a local Ray)")
    if cpus is not None and address != LOCAL:
        raise ConfigError(f"--ray-cpus sizes a local Ray; the cluster at {address} has its own CPUs")
    if cpus is not None and cpus < 1:
        raise ConfigError(f"--ray-cpus must be >= 1, got {cpus}")
    _ray()


def check_shared(out: Path, lock: str) -> None:
    """On a task's node: ``out`` is the driver's folder, still held by the driver (its lock is there, as the
    driver wrote it), and its ``runs/`` can be written; else a :class:`ConfigError` naming the node."""
    host = socket.gethostname()
    try:
        seen = (out / ".lock").read_text()
    except OSError:
        seen = None
    if seen != lock:
        raise ConfigError(f"--out {out} on node {host} does not hold this sweep's lock: --ray needs an --out that "
                          "every node sees at the same path (a shared filesystem)")
    try:
        with tempfile.TemporaryFile(dir=out / "runs"):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out}/runs cannot be written on node {host}: {e.strerror or e}") from None


def _cell_task(task: str, cfg: Any, cell: Any, out: str, lock: str, device: str) -> dict[str, Any]:
    """One cell on a Ray worker: one torch thread, the folder checked, the cell trained and written."""
    from .sweep import run_cell

    torch.set_num_threads(1)
    check_shared(Path(out), lock)
    # checked again before the file is written: a driver that died and a rerun that took --out over since
    # would otherwise see this task write into the rerun's folder
    result = run_cell(task, cfg, cell, Path(out), "cuda" if device.startswith("cuda") else device, backend="ray",
                      guard=lambda: check_shared(Path(out), lock))
    return {k: result[k] for k in ("host", "pid", "wall_s")}


def _reason(error: BaseException) -> str:
    """A task's error in one line: the cell's own exception where Ray carries it, else Ray's."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    text = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_on_ray(task: str, cfg: Any, todo: list[Any], out: Path, lock: Path, device: str, address: str,
               cpus: int | None, say: Callable[[str], None]) -> None:
    """Train the cells ``todo`` of the sweep in ``out`` (whose ``lock`` this process holds) as Ray tasks.

    Every task runs to its end; then :class:`CellsFailed` names the cells that failed and why.
    """
    ray = _ray()
    if not todo:
        return  # every cell is finished: no Ray to start
    name = f"sweep-{task}"
    started = not ray.is_initialized()
    if started:
        options = {"num_cpus": cpus or os.cpu_count(), "include_dashboard": False} if address == LOCAL else {}
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray {address}: cannot join the Ray cluster ({_reason(e)})") from None
    try:
        remote = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(_cell_task)
        (out / "runs").mkdir(exist_ok=True)
        shared, held = str(out.resolve()), lock.read_text()
        say(f"[{name}] {len(todo)} cells as Ray tasks, {ray.cluster_resources().get('CPU', 0):g} CPUs in the "
            "cluster")
        pending = {remote.remote(task, cfg, cell, shared, held, device): cell for cell in todo}
        failed: list[tuple[str, str]] = []
        finished = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    cell = pending.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        failed.append((cell.key, _reason(e)))
                        say(f"[{name}] {cell.key} failed: {failed[-1][1]}")
                        continue
                    finished += 1
                    say(f"[{name} {finished + len(failed)}/{len(todo)}] {cell.key} ({cfg.seeds} seeds) on "
                        f"{info['host']} (pid {info['pid']}), {info['wall_s']:g} s")
        finally:
            for ref in pending:  # interrupted: no task writes into --out once its lock is released
                ray.cancel(ref, force=True)
        if failed:
            reasons: dict[str, list[str]] = {}
            for key, why in failed:
                reasons.setdefault(why, []).append(key)
            named = "; ".join(f"{', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}: {why}"
                              for why, keys in reasons.items())
            raise CellsFailed(f"{len(failed)} of {len(todo)} cells failed on Ray ({named}); the {finished} that "
                              f"finished are saved in {out}: rerun the same command to run the rest")
    finally:
        if started:
            ray.shutdown()
