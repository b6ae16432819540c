"""The output folder as a user meets it: one run at a time (a lock), --fresh, what a rerun says it
skips and resumes, progress bars that stay, no empty folders left, threads and the quick preset recorded,
TensorBoard events beside the JSON lines."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adoptim_repro import runner, toy
from repro_helpers import run_cli

SMALL = ["--set", "steps=200", "runs=4", "ks=10", "beta2s=0.5", "log_points=4", "chunk=50", "compile=false",
         "optimizers=adam,adopt"]


def _toy(out: Path, *extra: str) -> int:
    return run_cli("toy", *SMALL, *extra, "--out", out)


def _lock(out: Path, pid: int, host: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-01 10:00:00"}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the lock ------------------------------------------------------------------------------------------
def test_a_folder_held_by_a_live_run_is_refused_in_one_line_and_left_alone(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "o"
        lock = _lock(out, holder.pid)
        before = lock.read_text()
        assert _toy(out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("adoptim: error: ")
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"] and lock.read_text() == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over_with_a_message(tmp_path, capsys):
    out, pid = tmp_path / "o", _dead_pid()
    _lock(out, pid)
    assert _toy(out) == 0
    assert f"taking over the lock of pid {pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists()  # released when the run ended
    assert (out / "summary.json").exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "o"
    _lock(out, _dead_pid(), host="some-other-host")  # its process cannot be checked from here
    assert _toy(out) == 2
    assert "in use by another run" in capsys.readouterr().err
    assert not (out / "config.json").exists()


@pytest.mark.slow
def test_two_runs_on_one_folder_the_second_refuses_and_the_first_logs_each_step_once(tmp_path):
    out = tmp_path / "o"
    args = [sys.executable, "-m", "adoptim_repro", "toy", *SMALL, "steps=60000", "chunk=6000", "log_points=6",
            "--out", str(out), "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    assert first.wait(timeout=240) == 0
    assert second.returncode == 2 and "is in use by another run" in second.stderr
    for name in ("adam-s0", "adopt-s0"):
        steps = [json.loads(s)["step"] for s in (out / "metrics" / f"{name}.jsonl").read_text().splitlines()]
        assert steps == [10000 * i for i in range(1, 7)]


# -- --fresh, rerun and resume messages ----------------------------------------------------------------
def test_fresh_starts_over_in_a_used_folder_and_touches_nothing_else(tmp_path, capsys):
    out = tmp_path / "o"
    assert _toy(out) == 0
    (out / "notes.txt").write_text("mine")
    assert _toy(out, "--set", "lr_decay=0.5") == 2  # another config: refused without --fresh
    assert "--fresh to start over" in capsys.readouterr().err
    assert _toy(out, "--set", "lr_decay=0.5", "--fresh") == 0
    assert json.loads((out / "config.json").read_text())["config"]["lr_decay"] == 0.5
    assert len((out / "metrics" / "adam-s0.jsonl").read_text().splitlines()) == 4  # not appended to the old
    assert (out / "notes.txt").read_text() == "mine"


def test_fresh_in_a_folder_held_by_a_live_run_is_refused_and_removes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert _toy(out) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _lock(out, holder.pid)
        capsys.readouterr()
        assert _toy(out, "--fresh") == 2  # the lock is taken before anything is removed
        assert f"is in use by another run (pid {holder.pid}" in capsys.readouterr().err
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p != lock}
        assert after == before
    finally:
        holder.kill()
        holder.wait()


def test_a_rerun_says_what_it_skips_and_where_it_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    real_draws = toy.draws

    def interrupted(cfg, seed, chunk, length):  # the adopt unit is killed in its third chunk
        if chunk == 2 and interrupted.unit == "adopt":
            raise KeyboardInterrupt
        return real_draws(cfg, seed, chunk, length)

    real_run = toy.EXPERIMENT.run

    def run(cfg, unit, ctx):
        interrupted.unit = unit.optimizer
        return real_run(cfg, unit, ctx)

    with monkeypatch.context() as m:
        m.setattr(toy, "draws", interrupted)
        m.setattr(toy, "EXPERIMENT", dataclasses.replace(toy.EXPERIMENT, run=run))
        assert _toy(out, "--checkpoint-every", "0") == 130
    assert not (out / ".lock").exists()  # released on the interrupt too
    capsys.readouterr()
    assert _toy(out) == 0
    err = capsys.readouterr().err
    assert "1 of 2 units already finished" in err and "skipped: adam-s0" in err
    assert "resuming adopt-s0 from its checkpoint at step 100" in err
    assert _toy(out) == 0
    assert "all 2 units already finished" in capsys.readouterr().err


def test_progress_bars_stay_at_their_final_state_and_no_empty_folder_is_left(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    saved = []
    real_write = runner._io.write_torch
    monkeypatch.setattr(runner._io, "write_torch", lambda path, obj: (saved.append(path), real_write(path, obj)))
    assert _toy(out, "--checkpoint-every", "0") == 0
    assert {p.parent for p in saved} == {out / "checkpoints"}  # checkpoints were written (and then removed)
    err = capsys.readouterr().err
    for key in ("adam-s0", "adopt-s0"):
        # What a log file shows last for the unit's bar: its finished state, not a bar stuck part-way.
        states = [s for s in err.replace("\r", "\n").splitlines() if f" {key}:" in s]
        assert states and "200/200" in states[-1] and "100%" in states[-1], states[-1:]
    assert not (out / "checkpoints").exists()
    assert not (out / ".lock").exists()


# -- what config.json records --------------------------------------------------------------------------
def test_threads_and_the_preset_are_recorded(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert _toy(tmp_path / "o", "--threads", "1") == 0
    finally:
        torch.set_num_threads(before)
    meta = json.loads((tmp_path / "o" / "config.json").read_text())
    assert meta["threads"] == 1 and meta["preset"] == "default"
    assert json.loads((tmp_path / "o" / "runs" / "adam-s0.json").read_text())["threads"] == 1
    assert run_cli("toy", "--threads", "0", "--out", tmp_path / "p") == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_a_quick_run_says_it_proves_the_path_not_the_claim(tmp_path, capsys):
    assert _toy(tmp_path / "d") == 0
    assert runner.QUICK_NOTE not in (tmp_path / "d" / "summary.md").read_text()
    assert run_cli("toy", "--quick", *SMALL, "--out", tmp_path / "q") == 0
    assert runner.QUICK_NOTE in (tmp_path / "q" / "summary.md").read_text()
    assert "proves the code path, not the paper's claim" in capsys.readouterr().err
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["preset"] == "quick"


# -- TensorBoard ---------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="the tensorboard extra is not installed")
def test_tensorboard_events_hold_the_json_lines_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    assert _toy(out, "--tensorboard") == 0
    lines = [json.loads(s) for s in (out / "metrics" / "adopt-s0.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard" / "adopt-s0"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("median/0/0")]  # k=10, beta2=0.5
    assert [s for s, _ in got] == [r["step"] for r in lines]
    assert [v for _, v in got] == pytest.approx([r["median"][0][0] for r in lines], rel=1e-6)  # float32 events


def test_tensorboard_without_the_package_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert _toy(tmp_path / "o", "--tensorboard") == 2
    assert "pip install 'adoptim-repro[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
