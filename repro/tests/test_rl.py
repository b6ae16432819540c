"""The rl experiment: PPO's pieces against closed forms, resume, and a tiny --quick run."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from adoptim_repro.config import ConfigError, resolve  # noqa: E402
from adoptim_repro.rl import EXPERIMENT, PPO, RlConfig, RunningMeanStd, _gae  # noqa: E402
from adoptim_repro.runner import run_experiment  # noqa: E402

TINY = {"env": "Pendulum-v1", "total_steps": 512, "rollout_steps": 256, "envs": 2, "minibatches": 4,
        "update_epochs": 2, "eval_episodes": 1, "seeds": 1}


def test_running_mean_std_equals_numpy_on_the_whole_stream():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, (n, 4)) for n in (1, 7, 30, 2)]
    rms = RunningMeanStd((4,))
    for c in chunks:
        rms.update(c)
    allx = np.concatenate(chunks)
    # The prior count of 1e-4 at mean 0, var 1 shifts the result by about 1e-4 / 40.
    np.testing.assert_allclose(rms.mean, allx.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rms.var, allx.var(0), rtol=1e-4)


def _gae_by_definition(rew, val, done, next_val, gamma, lam):
    """A_t = sum_l (gamma*lam)^l delta_{t+l}, the sum stopping after the step that ends an episode."""
    T, N = rew.shape
    vals = np.vstack([val, next_val[None]])
    out = np.zeros_like(rew)
    for n in range(N):
        for t in range(T):
            total, coef = 0.0, 1.0
            for u in range(t, T):
                boot = 0.0 if done[u, n] else gamma * vals[u + 1, n]
                total += coef * (rew[u, n] + boot - vals[u, n])
                if done[u, n]:
                    break
                coef *= gamma * lam
            out[t, n] = total
    return out


def test_gae_matches_its_definition():
    rng = np.random.default_rng(1)
    T, N = 9, 3
    rew, val, nv = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=N)
    done = np.zeros((T, N))
    done[3, 0] = done[8, 1] = done[0, 2] = done[5, 2] = 1
    np.testing.assert_allclose(_gae(rew, val, done, nv, 0.99, 0.95),
                               _gae_by_definition(rew, val, done, nv, 0.99, 0.95), rtol=1e-12)


def test_rollout_log_probs_are_the_policy_log_probs():
    cfg = resolve(RlConfig, list(TINY.items()))
    ppo = PPO(cfg, "adopt", seed=0)
    obs, act, logp, adv, ret = ppo._rollout()
    with torch.no_grad():
        d = ppo.agent.dist(torch.from_numpy(obs.reshape(-1, obs.shape[-1])))
        ref = d.log_prob(torch.from_numpy(act.reshape(-1, act.shape[-1]))).sum(-1).double().numpy()
    # The rollout computes the Gaussian log-density in numpy; the update's ratio starts at exactly 1.
    np.testing.assert_allclose(logp.reshape(-1), ref, rtol=1e-5, atol=1e-5)
    assert obs.shape == (128, 2, 3) and act.shape == (128, 2, 1)
    assert np.isfinite(adv).all() and np.isfinite(ret).all()
    ppo.close()


@pytest.mark.parametrize("env", ["Pendulum-v1", "HalfCheetah-v5", "Ant-v5"])
def test_state_round_trip_continues_identically(env):
    # A resumed run goes on with the episodes in flight: each simulator's state (MuJoCo's MjData whole:
    # Ant's reward reads the torso position it computed before the last step), the time limit's count,
    # the last observations, running returns and statistics. Two more iterations must then equal those of
    # the uninterrupted run, bit for bit. (Without the simulators' state they differed from the next
    # iteration on.)
    if env != "Pendulum-v1":
        pytest.importorskip("mujoco")
    cfg = resolve(RlConfig, list({**TINY, "env": env, "total_steps": 2048}.items()))
    a = PPO(cfg, "adopt", seed=3)
    a.iterate()
    state = pickle.loads(pickle.dumps(a.state()))  # as through a checkpoint file
    b = PPO(cfg, "adopt", seed=3)
    b.load(state)
    assert b.iteration == 1
    for _ in range(2):
        a.iterate()
        b.iterate()
    for p, q in zip(a.agent.parameters(), b.agent.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    np.testing.assert_array_equal(a.norm.obs.mean, b.norm.obs.mean)
    np.testing.assert_array_equal(a.raw, b.raw)
    assert a.episodes == b.episodes and a.rng.standard_normal() == b.rng.standard_normal()
    a.close()
    b.close()


def test_annealed_lr_reaches_zero_linearly():
    cfg = resolve(RlConfig, list(TINY.items()))
    ppo = PPO(cfg, "adam", seed=0)
    seen = []
    for _ in range(ppo.iterations):
        ppo.iterate()
        seen.append(ppo.opt.param_groups[0]["lr"])
    assert seen == pytest.approx([3e-4 * (1 - i / ppo.iterations) for i in range(ppo.iterations)])
    ppo.close()


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="'rollout_steps' \\(100\\) must be divisible"):
        resolve(RlConfig, [("rollout_steps", "100"), ("envs", "3")])
    with pytest.raises(ConfigError, match="'total_steps'"):
        resolve(RlConfig, [("total_steps", "10")])
    cfg = resolve(RlConfig, [*TINY.items(), ("env", "CartPole-v1")])
    with pytest.raises(ValueError, match="continuous"):
        PPO(cfg, "adam", 0)
    cfg = resolve(RlConfig, [*TINY.items(), ("env", "NoSuchEnv-v0")])
    with pytest.raises(ValueError, match="cannot make 'NoSuchEnv-v0'"):
        PPO(cfg, "adam", 0)


def test_an_environment_that_cannot_be_made_is_refused_before_anything_is_written(tmp_path, capsys):
    from repro_helpers import run_cli

    assert run_cli("rl", "--quick", "--set", "env=NoSuchEnv-v0", "--out", tmp_path / "o") == 2
    assert "config key 'env': gymnasium cannot make 'NoSuchEnv-v0'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_quick_run_writes_results(tmp_path):
    cfg = resolve(RlConfig, [*EXPERIMENT.quick.items(), *TINY.items()])
    summary = run_experiment(EXPERIMENT, cfg, tmp_path, log=lambda s: None)
    rows = {r["optimizer"]: r for r in summary["final"]}
    assert set(rows) == {"adam", "adopt"}
    for r in rows.values():
        # A Pendulum-v1 episode is 200 steps with rewards in [-16.27, 0].
        assert -16.28 * 200 <= r["eval_return"] <= 0 and r["env"] == "Pendulum-v1" and r["steps"] == 512
    assert (tmp_path / "rl.png").stat().st_size > 1000
    assert len((tmp_path / "metrics" / "adam-s0.jsonl").read_text().splitlines()) == 2
    assert math.isfinite(rows["adopt"]["eval_return"])


def _rl_rank(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        cfg = resolve(RlConfig, list(TINY.items()))
        ppo = PPO(cfg, "adopt", seed=0, rank=rank, world=world)
        first = torch.cat([p.detach().flatten() for p in ppo.agent.parameters()]).clone()
        ppo.iterate()
        after = torch.cat([p.detach().flatten() for p in ppo.agent.parameters()])
        torch.save({"first": first, "after": after, "obs_mean": ppo.norm.obs.mean.copy()}, f"{out}/rank{rank}.pt")
        ppo.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_average_gradients_and_stay_identical(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    mp.start_processes(_rl_rank, args=(2, store.port, str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert torch.equal(r0["first"], r1["first"])  # the same initial agent everywhere
    # Each process stepped different environments (its observation statistics differ), yet the averaged
    # gradients keep the agents identical; without averaging they would drift apart after one update.
    assert not np.allclose(r0["obs_mean"], r1["obs_mean"])
    assert torch.equal(r0["after"], r1["after"]) and not torch.equal(r0["after"], r0["first"])
