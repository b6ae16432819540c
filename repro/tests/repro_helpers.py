"""Shared helpers for the experiment tests: a tiny synthetic MNIST in IDX files, running the CLI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

from adoptim_repro.cli import main


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def tiny_mnist(root: Path, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Path:
    """IDX files of a learnable 10-class problem: class c lights a 4-pixel-wide column block, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n)
        x = (rng.random((n, 28, 28)) < 0.1) * 255
        for i, c in enumerate(y):
            x[i, 4:24, 2 + 2 * c:6 + 2 * c] = 255
        write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def kill_then_resume(cmd: list[str], out: Path, cells: int) -> None:
    """Kill the sweep ``cmd`` (writing into ``out``, a grid of ``cells``) once two cells are written, rerun
    it, and check that it finished only the other cells, in one process, and wrote the summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "runs").glob("*.json"))) < 2:
        assert proc.poll() is None, "the sweep finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "runs").glob("*.json")}
    assert 2 <= len(before) < cells
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"{len(before)} of {cells} cells already finished" in done.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "runs").glob("*.json")}
    assert len(after) == cells and {k: after[k] for k in before} == before  # finished cells untouched
    assert len({json.loads(v[1])["pid"] for k, v in after.items() if k not in before}) == 1
    assert len(json.loads((out / "summary.json").read_text())["final"]) == cells
    assert not (out / ".lock").exists()
