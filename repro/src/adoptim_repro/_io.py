"""Atomic file writes and JSON-lines helpers: a reader never sees a half-written result."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write: Any, mode: str) -> None:
    # Write beside the target and rename: os.replace is atomic on one filesystem, so a kill at any
    # moment leaves either the old file or the new one, never a torn one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), "w")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: f.write(text), "w")


def write_torch(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    _atomic(Path(path), lambda f: torch.save(obj, f), "wb")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file; a missing file has none."""
    if not Path(path).exists():
        return iter(())
    with open(path) as f:
        return iter([json.loads(line) for line in f if line.strip()])
