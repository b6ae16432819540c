"""The output folder (``--out``) of a run: held by one run at a time, checked against the config that
made it, started over on request.

- ``.lock``: created exclusively (under an flock of the folder) with the owner's pid, host and start
  time; a second run refuses in one line; the lock of a dead process on this host is taken over.
- :func:`check_out`: a folder made by another experiment or config is refused (``seeds`` may change).
- :func:`start_fresh` (``--fresh``): removes what runs write there, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import _io
from .config import ConfigError

Record = dict[str, Any]

LOCK = ".lock"
# What a run writes into --out (all of it removed by --fresh; nothing else there is touched).
OUTPUTS = ("config.json", "runs", "metrics", "checkpoints", "tensorboard", "summary.json", "summary.md",
           "pretrained", "smoke_data")


def read_result(path: Path, what: str, check: Callable[[Any], bool]) -> Any:
    """A results file of ``out`` parsed, or a :class:`ConfigError` naming it (results are written
    atomically, so only damage from outside makes one unreadable)."""
    try:
        value = _io.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); {what}") from None
    if not check(value):
        raise ConfigError(f"{path} does not hold what this runner writes there; {what}")
    return value


def check_writable(out: Path) -> None:
    """``out`` is (or can be made) a directory this process can write into, or a :class:`ConfigError`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out} cannot hold results: {e.strerror or e}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def _guard(out: Path) -> Any:
    """Serialise lock-taking processes on ``out`` (flock on the folder itself, where there is one)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: the lock file's exclusive creation alone
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_lock(out: Path, say: Callable[[str], None], name: str = LOCK) -> Path:
    """Hold ``out`` for this process: ``out/.lock`` created exclusively with this pid, host and start time.

    A lock of a live process (or of any process on another host) refuses in one line; the lock of a
    process that is no longer running on this host is taken over, with a message. ``name`` picks
    another lock file (a sweep's shards each hold their own, sharing one folder).
    """
    path = out / name
    host = socket.gethostname()
    with _guard(out):
        if path.exists():
            try:
                holder = json.loads(path.read_text())
                pid, owner, since = int(holder["pid"]), str(holder["host"]), str(holder.get("started", "?"))
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"{path} exists but is not a lock this runner wrote; if no run is using {out}, "
                                  "delete it") from None
            if owner != host or pid == os.getpid() or _alive(pid):
                raise ConfigError(f"{out} is in use by another run (pid {pid} on {owner}, since {since}); wait for "
                                  f"it to finish or use another --out (if it is gone, delete {path})")
            say(f"[lock] {out}: taking over the lock of pid {pid} (started {since}), which is no longer running")
            path.unlink()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    return path


def release_lock(path: Path) -> None:
    path.unlink(missing_ok=True)


def start_fresh(out: Path) -> None:
    """Remove what earlier runs wrote into ``out`` (and nothing else)."""
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for png in out.glob("*.png"):
        png.unlink()


def remove_stale_temporaries(out: Path) -> None:
    # A kill during an atomic write leaves its temporary file (never read: the target is renamed into
    # place only when complete). Checkpoints are large, so they are removed before a run goes on.
    for tmp in out.glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)


def check_out(out: Path, meta: Record, say: Callable[[str], None]) -> None:
    path = out / "config.json"
    if not path.exists():
        return
    old = read_result(path, "remove it (and the results beside it), use --fresh, or use another --out",
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
                "rerun with the same config to resume, --fresh to start over, or use another --out")
    if old.get("threads") not in (None, meta["threads"]):
        say(f"[{meta['experiment']}] note: the results so far used {old['threads']} threads, this run "
            f"{meta['threads']}; float results depend on the thread count")
