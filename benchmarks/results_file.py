"""The JSON results file every benchmark writes with ``--json PATH``: its data and where it was measured.

Schema (one object per file)::

    {"benchmark": "host_overhead",            # the script's name; benchmarks/render_docs.py renders by it
     "command": "python benchmarks/host_overhead.py --repeats 500 --json ...",
     "date": "2026-12-03T08:30:00Z",          # UTC, when the file was written
     "machine": {"cpu": "AMD EPYC ...", "logical_cpus": 2, "physical_cores": 1, "torch_threads": 1,
                 "platform": "Linux-...", "python": "3.11.7", "load_average": 0.4},
     "torch": "2.13.0+cpu", "adoptim": "0.1.0",
     "commit": "ade7286...", "dirty": false,  # git HEAD; whether tracked library or benchmark files differed
     "settings": {...},                       # the script's arguments
     "results": ...}                          # the script's own data (see its docstring)

Only the standard library and torch are used, so any benchmark can import it (they run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (socket, core) pairs in ``/proc/cpuinfo``; None where it cannot be read."""
    try:
        pairs, phys = set(), None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                pairs.add((phys, value.strip()))
        return len(pairs) or None
    except OSError:
        return None


def machine(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU model, cores, the torch threads the benchmark used."""
    out: dict[str, Any] = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):  # how busy the machine was: a loaded one runs slower
        out["load_average"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def write(path: Path, benchmark: str, settings: dict[str, Any], results: Any, threads: int | None = None) -> None:
    """Write ``results`` of ``benchmark`` with its provenance to ``path`` (atomically)."""
    import adoptim

    # Uncommitted changes to tracked files of the library or the benchmarks; results files are not code
    # (rerunning a benchmark rewrites a committed one).
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks", "setup.py",
                  "pyproject.toml", ":(exclude)benchmarks/results")
    doc = {
        "benchmark": benchmark,
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(threads),
        "torch": torch.__version__,
        "adoptim": adoptim.__version__,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "results": results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)  # a reader never sees a half-written file


def load(path: Path) -> dict[str, Any]:
    """A results file written by :func:`write`."""
    return json.loads(Path(path).read_text())
