"""The rl experiment: the suite's optimizer inside Stable-Baselines3's PPO, the summary's paired difference
against a closed form, config errors, resume, and a tiny --quick run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from adoptim import ADOPT  # noqa: E402
from adoptim_repro.config import ConfigError, resolve  # noqa: E402
from adoptim_repro.distributed import Dist  # noqa: E402
from adoptim_repro.rl import EXPERIMENT, RlConfig, _train_env, make_model, preflight, run, summarize  # noqa: E402
from adoptim_repro.runner import RunContext, Unit  # noqa: E402

TINY = {"env_ids": ("Pendulum-v1",), "total_steps": 512, "n_envs": 2, "n_steps": 128, "batch_size": 64,
        "n_epochs": 2, "eval_episodes": 1, "seeds": 1}


def _cfg(**kw):
    return resolve(RlConfig, list({**TINY, **kw}.items()))


@pytest.mark.parametrize("name", ["adam", "adopt", "adopt-8bit"])
def test_the_policy_optimizer_is_the_configured_one(name):
    cfg = _cfg()
    model = make_model(cfg, name, _train_env(cfg, "Pendulum-v1", 0), seed=0)
    opt = model.policy.optimizer
    spec = cfg.optim[name]
    assert isinstance(opt, ADOPT if name.startswith("adopt") else torch.optim.Adam)
    (group,) = opt.param_groups
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (3e-4, spec.betas, spec.eps)
    assert spec.eps == (1e-5 if name == "adam" else 1e-6)  # SB3's Adam eps, ADOPT's own
    if name == "adopt-8bit":
        assert group["state_precision"] == "8bit"
    assert {id(p) for p in group["params"]} == {id(p) for p in model.policy.parameters()}
    model.learn(cfg.n_envs * cfg.n_steps)
    # One optimizer step per minibatch of every epoch: 2 epochs x 256 / 64.
    steps = {float(s["step"]) for s in opt.state.values()}
    assert steps == {2 * 256 / 64}
    if name == "adopt":
        assert all({"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in opt.state.values())
    model.get_env().close()


def test_summary_pairs_adopt_minus_adam_by_seed_per_env():
    # Per seed adopt - adam = 1, 2, 3 on A (mean 2, sd 1) and 10, 11, 12 on B (mean 11, sd 1).
    recs = []
    for env, base in (("A", 0.0), ("B", 9.0)):
        for seed in range(3):
            recs.append({"env": env, "optimizer": "adam", "seed": seed, "steps": 8, "eval_return": 5.0 * seed})
            recs.append({"env": env, "optimizer": "adopt", "seed": seed, "steps": 8,
                         "eval_return": 5.0 * seed + base + seed + 1})
    rows = {(r["env"], r["optimizer"]): r for r in summarize(None, recs)}
    # t(0.975, 2 df) = 0.95 / sqrt(2 * 0.975 * 0.025) exactly; times sd / sqrt(n) with sd = 1.
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    for env, mean, excludes in (("A", 2.0, "no"), ("B", 11.0, "yes")):
        row = rows[(env, "adam")]
        assert row["adopt-x eval_return"] == pytest.approx(mean)
        # report.t975 tabulates t to three decimals (4.303): within 1e-4 of the exact value.
        assert row["adopt-x eval_return ci95"] == pytest.approx(half, rel=1e-4)
        assert row["adopt-x eval_return excludes 0"] == excludes
        assert rows[(env, "adopt")]["adopt-x eval_return"] is None
        assert row["eval_return"] == pytest.approx(5.0) and row["seeds"] == 3


def test_config_errors_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"'total_steps' \(500\) must be a multiple of n_envs \* n_steps \(256\)"):
        _cfg(total_steps=500)
    with pytest.raises(ConfigError, match=r"'batch_size' \(100\) must divide"):
        _cfg(batch_size=100)
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        _cfg(optimizers=("adam", "sgd"))
    with pytest.raises(ConfigError, match="'n_envs' must be >= 1"):
        _cfg(n_envs=0)
    with pytest.raises(ConfigError, match="cannot make 'NoSuchEnv-v0'"):
        preflight(_cfg(env_ids=("Pendulum-v1", "NoSuchEnv-v0")))
    with pytest.raises(ConfigError, match="needs a continuous"):
        preflight(_cfg(env_ids=("CartPole-v1",)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="not under torchrun"):
        preflight(_cfg())


def test_a_bad_env_is_refused_before_anything_is_written(tmp_path, capsys):
    from repro_helpers import run_cli

    assert run_cli("rl", "--quick", "--set", "env_ids=NoSuchEnv-v0", "--out", tmp_path / "o") == 2
    assert "config key 'env_ids': gymnasium cannot make 'NoSuchEnv-v0'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class _Killed(Exception):
    pass


class _KillAfterFirstCheckpoint(RunContext):
    def checkpoint(self, state, force=False):
        super().checkpoint(state, force=True)
        raise _Killed


def test_a_unit_resumed_from_its_checkpoint_reaches_the_total_steps(tmp_path):
    cfg = _cfg(total_steps=768)  # 3 rollouts of 256
    unit = Unit("adopt", 0, (("env", "Pendulum-v1"),))
    dist = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(_Killed):
        run(cfg, unit, _KillAfterFirstCheckpoint(tmp_path, unit, dist, checkpoint_every=0))
    ctx = RunContext(tmp_path, unit, dist, checkpoint_every=3600)
    saved = torch.load(ctx.checkpoint_path, weights_only=False)["state"]
    assert saved["steps"] == 256
    rec = run(cfg, unit, ctx)
    ctx.close()
    assert rec["steps"] == 768 and len(rec["eval_returns"]) == 1
    steps = [json.loads(line)["step"] for line in ctx.metrics_path.read_text().splitlines()]
    assert steps == [256, 512, 768]  # the line logged before the kill is not repeated


@pytest.mark.slow
def test_quick_run_writes_the_summary_and_a_killed_run_keeps_finished_units(tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "adoptim_repro", "rl", "--quick", "--threads", "1", "--out", str(out),
           "--set", "total_steps=1024", "n_steps=128", "n_epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*.json")):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in (out / "runs").glob("*.json")}
    assert 1 <= len(before) < 4 and not (out / "summary.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert f"{len(before)} of 4 units already finished" in done.stderr
    for name, data in before.items():
        assert (out / "runs" / name).read_bytes() == data  # kept, not redone
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["optimizer"]: r for r in summary["final"]}
    assert set(rows) == {"adam", "adopt"} and all(r["env"] == "Pendulum-v1" for r in rows.values())
    recs = {(r["optimizer"], r["seed"]): r for p in (out / "runs").glob("*.json")
            for r in json.loads(p.read_text())["records"]}
    for r in recs.values():
        # A Pendulum-v1 episode is 200 steps with rewards in [-16.28, 0].
        assert r["steps"] == 1024 and -16.28 * 200 <= r["eval_return"] <= 0
    diffs = [recs[("adopt", s)]["eval_return"] - recs[("adam", s)]["eval_return"] for s in (0, 1)]
    assert rows["adam"]["adopt-x eval_return"] == pytest.approx(sum(diffs) / 2)
    assert (out / "rl.png").stat().st_size > 1000


def test_quick_preset_is_valid_and_small():
    cfg = resolve(RlConfig, list(EXPERIMENT.quick.items()))
    assert cfg.env_ids == ("Pendulum-v1",) and cfg.total_steps * cfg.seeds * len(cfg.optimizers) <= 8192
