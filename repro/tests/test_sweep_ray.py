"""``adoptim sweep --ray``: the cells as tasks on a Ray cluster started here (a local Ray of two CPUs, and a
``ray start --head`` for the ADDRESS form), against a serial run of the same grid; resuming across the
two ways; a failing cell named; the refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adoptim_repro import cluster
from adoptim_repro.config import ConfigError
from repro_helpers import run_cli, tiny_mnist

# 2 optimizers x 2 beta2 x 2 lr: 8 cells of 2 seeds, 20 steps each (a second or two of training in all)
GRID = ["--set", "hidden=16", "batch_size=32", "steps=20", "seeds=2", "optimizers=adam,adopt", "beta2s=0.5,0.9",
        "lrs=1e-3,1e-2"]
KEYS = sorted(f"{o}-b{b}-lr{lr}" for o in ("adam", "adopt") for b in ("0.5", "0.9") for lr in ("0.001", "0.01"))
TIMING = ("train_s", "wall_s", "ms_per_seed_step")  # the cost's seconds: the only fields two runs may differ in


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "mnist", "--out", str(out), "--threads", "1", *extra, *GRID, f"data_dir={data}"]


@pytest.fixture(scope="module")
def serial(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The grid trained in this process, one cell after another: what every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("serial")
    assert run_cli(*_args(data, out)) == 0
    return out


@pytest.fixture(scope="module")
def local_ray() -> object:
    """A local Ray of two CPUs for this module; the sweep uses the connection this process holds."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new one, whatever else runs here
    yield ray
    ray.shutdown()


def _cells(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _same_summary(out: Path, reference: Path) -> None:
    """The summaries are equal in every field but the seconds the cells took (the cells are deterministic
    given their seeds, and both ways train on one torch thread: the records agree bit for bit)."""
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    for s in (got, want):
        for key in TIMING:
            s["cost"].pop(key)
    assert got == want
    assert {k: v["records"] for k, v in _cells(out).items()} == {k: v["records"] for k, v in _cells(reference).items()}


def test_the_ray_tasks_make_the_serial_runs_cells(data: Path, serial: Path, local_ray: object, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli(*_args(data, out, "--ray")) == 0
    err = capsys.readouterr().err
    cells = _cells(out)
    assert sorted(cells) == KEYS
    for c in cells.values():  # each cell trained in a Ray worker, on one thread
        assert c["backend"] == "ray" and c["threads"] == 1 and c["pid"] != os.getpid()
    assert all(c["backend"] == "serial" and c["pid"] == os.getpid() for c in _cells(serial).values())
    _same_summary(out, serial)
    assert f"[sweep-mnist {len(KEYS)}/{len(KEYS)}] " in err  # progress as the tasks finish
    assert not (out / ".lock").exists()
    files = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert run_cli(*_args(data, out, "--ray")) == 0  # again: nothing left to train, and no task submitted
    err = capsys.readouterr().err
    assert f"{len(KEYS)} of {len(KEYS)} cells already finished" in err and "Ray tasks" not in err
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")} == files


def test_a_sweep_resumes_across_the_serial_and_the_ray_ways(data: Path, serial: Path, local_ray: object,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # serial (as one shard of two) first, then --ray finishes it
    out = tmp_path / "serial-then-ray"
    assert run_cli(*_args(data, out, "--shard", "0/2")) == 0
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert len(before) == len(KEYS) // 2
    capsys.readouterr()
    assert run_cli(*_args(data, out, "--ray")) == 0
    assert f"{len(before)} of {len(KEYS)} cells already finished" in capsys.readouterr().err
    cells = _cells(out)
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.json") if p.name in before} == before
    assert sorted(k for k, c in cells.items() if c["backend"] == "ray") == sorted(set(KEYS) - {
        Path(n).stem for n in before})
    _same_summary(out, serial)
    # --ray first (over half of the grid: beta2 0.5), then the serial loop finishes the grown grid
    out = tmp_path / "ray-then-serial"
    half = [a if a != "beta2s=0.5,0.9" else "beta2s=0.5" for a in _args(data, out, "--ray")]
    assert run_cli(*half) == 0
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert len(before) == len(KEYS) // 2
    capsys.readouterr()
    assert run_cli(*_args(data, out)) == 0
    assert f"{len(before)} of {len(KEYS)} cells already finished" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.json") if p.name in before} == before
    assert sorted(k for k, c in _cells(out).items() if c["backend"] == "serial") == [k for k in KEYS if "-b0.9-" in k]
    _same_summary(out, serial)


def test_a_failing_cell_is_named_the_others_are_saved_and_a_rerun_resumes(
        data: Path, serial: Path, local_ray: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A folder where one cell's result file goes: the task trains the cell, and renaming its result there fails.
    out, bad = tmp_path / "out", "adopt-b0.9-lr0.01"
    (out / "runs" / f"{bad}.json").mkdir(parents=True)
    capsys.readouterr()
    assert run_cli(*_args(data, out, "--ray")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"adoptim: error: 1 of {len(KEYS)} cells failed on Ray ({bad}: IsADirectoryError"), last
    assert f"the {len(KEYS) - 1} that finished are saved in {out}: rerun the same command" in last
    assert sorted(p.stem for p in (out / "runs").glob("*.json") if p.is_file()) == sorted(set(KEYS) - {bad})
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()
    (out / "runs" / f"{bad}.json").rmdir()
    assert run_cli(*_args(data, out, "--ray")) == 0
    assert f"{len(KEYS) - 1} of {len(KEYS)} cells already finished" in capsys.readouterr().err
    _same_summary(out, serial)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_address_joins_a_running_cluster(data: Path, serial: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    # Ray 2.60's `ray start` turns token authentication on, and a driver's ray.init does not: both off here.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    port, log = _free_port(), tmp_path / "head.log"
    ports = ["--port", str(port), "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--node-manager-port", str(_free_port()),
             "--object-manager-port", str(_free_port())]
    with open(log, "w") as f:
        head = subprocess.Popen(["ray", "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard=false",
                                 "--disable-usage-stats", *ports], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopped below, and only it
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "adoptim_repro", *_args(data, out, "--ray", f"127.0.0.1:{port}")],
                              env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        assert "Connected to Ray cluster" in done.stderr  # joined, did not start one of its own
        assert all(c["backend"] == "ray" for c in _cells(out).values())
        _same_summary(out, serial)
    finally:
        # the head and every process it started, and nothing else (`ray stop` would stop every Ray of the machine)
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()


@pytest.mark.slow
def test_a_killed_ray_sweep_is_finished_by_the_serial_loop(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    longer = ["steps=300"]  # cells long enough (a second or so) to kill the sweep between them
    out, reference = tmp_path / "out", tmp_path / "serial"
    cmd = [sys.executable, "-m", "adoptim_repro", *_args(data, out, "--ray", "--ray-cpus", "2"), *longer]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group: the driver and the local Ray it started are killed together, as a node's loss would
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "runs").glob("*.json"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert 2 <= len(before) < len(KEYS) and not (out / "summary.json").exists()
    done = subprocess.run([*cmd[:cmd.index("--ray")], *cmd[cmd.index("--ray") + 3:]], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "taking over the lock" in done.stderr, done.stderr
    # The Ray workers are not in the driver's process group: one may finish its cell after the kill, until
    # the rerun takes the lock over (from then on a task refuses to write; check_shared's test shows it).
    skipped = int(re.search(rf"(\d+) of {len(KEYS)} cells already finished", done.stderr).group(1))
    assert skipped >= len(before)
    assert {p.name: p.read_bytes() for p in (out / "runs").glob("*.json") if p.name in before} == before
    backends = [c["backend"] for c in _cells(out).values()]
    assert len(backends) == len(KEYS) and backends.count("ray") == skipped
    assert run_cli(*_args(data, reference), *longer) == 0  # the same grid, serially from the start
    _same_summary(out, reference)


@pytest.mark.parametrize("flags, words", [
    (["--ray", "--shard", "0/2"], "--ray with --shard: Ray spreads the cells itself"),
    (["--ray-cpus", "2"], "--ray-cpus goes with --ray"),
    (["--ray", "auto", "--ray-cpus", "2"], "--ray-cpus sizes a local Ray; the cluster at auto has its own CPUs"),
    (["--ray", "--ray-cpus", "0"], "--ray-cpus must be >= 1, got 0"),
    (["--ray", "--cost"], "--cost times one cell on this machine; it does not go with --ray"),
])
def test_bad_ray_flags_are_one_line_before_anything_runs(flags: list[str], words: str, data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli(*_args(data, out, *flags)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adoptim: error: ") and words in err, err
    assert not out.exists()


def test_ray_missing_names_the_extra_to_install(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    out = tmp_path / "out"
    assert run_cli(*_args(data, out, "--ray")) == 2
    err = capsys.readouterr().err
    assert err == "adoptim: error: --ray needs Ray, which is not installed here: pip install 'adoptim-repro[cluster]'\n"
    assert not out.exists()


def test_a_task_refuses_an_out_that_is_not_the_drivers(tmp_path: Path) -> None:
    # What a node without the shared filesystem sees: no folder, or a folder without the driver's lock.
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="every node sees at the same path"):
        cluster.check_shared(out, '{"pid": 1}')
    (out / "runs").mkdir(parents=True)
    (out / ".lock").write_text('{"pid": 2}')
    with pytest.raises(ConfigError, match=f"--out {out} on node .* does not hold this sweep's lock"):
        cluster.check_shared(out, '{"pid": 1}')
    cluster.check_shared(out, '{"pid": 2}')  # the driver's folder: accepted
    assert list((out / "runs").iterdir()) == []  # the write check leaves nothing there


@pytest.mark.parametrize("task, page", [("mnist", "sweeps.md"), ("vae", "sweeps_vae.md"), ("gpt", "sweeps_gpt.md")])
def test_each_sweep_page_has_the_generated_past_one_machine_section(task: str, page: str) -> None:
    # The pages are written by `adoptim sweep TASK --doc`: the section there is sweep_report's, with the
    # page's own --set arguments (those of its --doc command), just before the Cost section.
    from adoptim_repro.sweep_report import cluster_section

    text = (Path(__file__).resolve().parents[2] / "docs" / "reproduction" / page).read_text()
    sets = re.search(rf"^adoptim sweep {task}(.*) --doc docs/reproduction/{page}", text, re.M).group(1)
    assert "\n" + "\n".join(cluster_section(task, sets)) + "\n\n## Cost\n" in text
    assert f"adoptim sweep {task}{sets} --ray --out results/sweep-{task}" in text
