"""Resume guarantee: a run killed mid-way and rerun with the same --out ends with the same results as an
uninterrupted run, without repeating finished work or metric lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro_helpers import run_cli, tiny_mnist

TOY = ["toy", "--set", "steps=12000", "--set", "runs=16", "--set", "chunk=200", "--set", "compile=false",
       "--set", "log_points=24"]


def _cmd(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "adoptim_repro", *args, "--out", str(out), "--checkpoint-every", "0"]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before it could be interrupted"
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _interrupted_then_resumed(args: list[str], out: Path, ready) -> None:
    proc = subprocess.Popen(_cmd(args, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: ready(out))
    assert not (out / "summary.json").exists()
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    subprocess.run(_cmd(args, out), env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Finished units were not rerun: their result files are untouched.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json") if p.name in done_before} \
        == done_before


def _same_results(a: Path, b: Path) -> None:
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa == sb
    names = sorted(p.name for p in (a / "metrics").glob("*.jsonl"))
    assert names == sorted(p.name for p in (b / "metrics").glob("*.jsonl")) and names
    for name in names:  # every metric line once, in order, identical
        assert (a / "metrics" / name).read_text() == (b / "metrics" / name).read_text()


@pytest.mark.slow
def test_toy_killed_mid_unit_resumes_to_the_same_summary(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(*TOY, "--out", whole) == 0

    def mid_second_unit(out: Path) -> bool:  # one unit finished, the next one checkpointed mid-way
        return len(list(out.glob("runs/*.json"))) >= 1 and any(out.glob("checkpoints/*.pt"))

    _interrupted_then_resumed(TOY, resumed, mid_second_unit)
    _same_results(whole, resumed)


@pytest.mark.slow
def test_mnist_killed_mid_unit_resumes_to_the_same_summary(tmp_path):
    # Model and optimizer state come back from the checkpoint; batches and init from the seed.
    data = tiny_mnist(tmp_path / "data", n_train=2048)
    args = ["mnist", "--seeds", "1", "--set", "steps=200", "--set", "hidden=64", "--set", "batch_size=32",
            "--set", "eval_every=100", "--set", "log_every=10", "--set", "optimizers=adopt,adam",
            "--set", f"data_dir={data}"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(*args, "--out", whole) == 0

    def mid_run(out: Path) -> bool:
        lines = out / "metrics" / "adopt-s0-seeds1.jsonl"  # the ensemble unit of adopt's one seed
        return any(out.glob("checkpoints/*.pt")) and lines.exists() and len(lines.read_text().splitlines()) >= 8

    _interrupted_then_resumed(args, resumed, mid_run)
    _same_results(whole, resumed)
