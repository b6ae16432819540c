"""Deep RL: Stable-Baselines3 PPO on MuJoCo, Adam against ADOPT (the paper's deep RL experiment).

Claim tested: with everything else fixed (the agent and its hyper-parameters), replacing Adam by ADOPT
gives an agent with an equal or higher return on MuJoCo locomotion (the paper shows HalfCheetah and Ant).
Here: Stable-Baselines3's PPO (its default MuJoCo settings: ``MlpPolicy``, 64x64 tanh actor and critic,
lr 3e-4, batch 64, 10 epochs, clip 0.2; vectorised environments in ``DummyVecEnv`` and ``VecNormalize``
as in the rl-zoo MuJoCo recipes), with the policy's optimizer set through
``policy_kwargs=dict(optimizer_class=..., optimizer_kwargs=...)`` to the suite's optimizer by name
(:func:`.optimizers.make_optimizer`: ``adam``, ``adopt``, ``adopt-8bit``, ...). The metric is the mean
undiscounted return of deterministic evaluation episodes at the end of training (observation statistics
frozen, reward not normalised), per seed; the summary gives per (environment, optimizer) the mean and 95%
interval over seeds, and the difference ADOPT minus each other optimizer paired by seed.

Run: ``adoptim rl --threads 1`` (HalfCheetah-v5 and Ant-v5, 2 optimizers x 8 seeds, ``total_steps`` per
run); ``adoptim rl --quick`` proves the code path on Pendulum-v1, not the claim.

Scale: a full-length MuJoCo PPO run is 1M environment steps; the default trains far fewer per run
(``adoptim list`` gives the measured run time), early in learning.

Resume: a unit checkpoints with SB3's own ``save`` (policy, optimizer state, step count) and the pickled
``VecNormalize`` statistics, and continues with ``learn(..., reset_num_timesteps=False)``. A resumed unit
reaches the same total steps but is not bit-identical to an unbroken one: the episodes in flight are
restarted and SB3 does not save its random streams.

Distributed: refused under ``torchrun`` (world size > 1): SB3's PPO trains in one process.
"""

from __future__ import annotations

import io
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import report
from .config import ConfigError
from .optimizers import OPTIMIZERS, OptimSpec, default_specs, make_optimizer
from .runner import Experiment, RunContext, RunResult, Unit


def sb3_optimizer(params: Any, lr: float, name: str, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> torch.optim.Optimizer:
    """SB3's ``optimizer_class``: SB3 calls it as ``optimizer_class(params, lr=..., **optimizer_kwargs)``;
    the optimizer is the suite's ``name`` built by :func:`.optimizers.make_optimizer`."""
    spec = OptimSpec(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    return make_optimizer(name, params, spec)


@dataclass
class RlConfig:
    """Stable-Baselines3 PPO on gymnasium environments; PPO settings are SB3's defaults."""

    env_ids: tuple[str, ...] = ("HalfCheetah-v5", "Ant-v5")
    """gymnasium environment ids (continuous actions, flat observations); one unit per env, optimizer, seed"""
    total_steps: int = 65_536
    """environment steps per run (all environments), a multiple of n_envs * n_steps"""
    n_envs: int = 4
    """parallel environments in the DummyVecEnv"""
    n_steps: int = 512
    """steps per environment in each rollout (rollout = n_envs * n_steps transitions)"""
    batch_size: int = 64
    """PPO minibatch size"""
    n_epochs: int = 10
    """passes over each rollout"""
    gamma: float = 0.99
    """discount factor (also VecNormalize's for the reward scale)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """PPO's ratio clipping"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping threshold"""
    eval_episodes: int = 5
    """deterministic evaluation episodes at the end"""
    seeds: int = 8
    """seeds 0..N-1 are run for each env and optimizer (mean, 95% interval and paired differences over them)"""
    optimizers: tuple[str, ...] = ("adam", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=lambda: default_specs(
        adam=OptimSpec(lr=3e-4, betas=(0.9, 0.999), eps=1e-5),
        adopt=OptimSpec(lr=3e-4, betas=(0.9, 0.9999), eps=1e-6)))
    """each optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""

    def validate(self) -> None:
        for key in ("total_steps", "n_envs", "n_steps", "batch_size", "n_epochs", "eval_episodes", "seeds"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if not self.env_ids:
            raise ValueError("config key 'env_ids' must name at least one environment")
        rollout = self.n_envs * self.n_steps
        if self.total_steps % rollout:
            raise ValueError(f"config key 'total_steps' ({self.total_steps}) must be a multiple of "
                             f"n_envs * n_steps ({rollout})")
        if rollout % self.batch_size:
            raise ValueError(f"config key 'batch_size' ({self.batch_size}) must divide n_envs * n_steps ({rollout})")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ValueError(f"config key 'optimizers': unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def units(cfg: RlConfig) -> list[Unit]:
    """One unit per (env, seed, optimizer)."""
    return [Unit(name, seed, (("env", env),)) for env in cfg.env_ids for seed in range(cfg.seeds)
            for name in cfg.optimizers]


def _check_env(name: str) -> None:
    try:
        import gymnasium as gym
    except ImportError:
        raise ConfigError("the rl experiment needs gymnasium with MuJoCo: pip install 'adoptim-repro[rl]'") from None
    try:
        env = gym.make(name)
    except gym.error.Error as e:
        raise ConfigError(f"config key 'env_ids': gymnasium cannot make {name!r} ({e})") from None
    try:
        if not isinstance(env.action_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
            raise ConfigError(f"config key 'env_ids': {name!r} needs a continuous (Box) action space and flat "
                              "observations")
    finally:
        env.close()


def preflight(cfg: RlConfig) -> None:
    """Refuse torchrun and make every environment once before any unit runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(f"the rl experiment runs in one process (SB3's PPO), not under torchrun (WORLD_SIZE={world})")
    for name in cfg.env_ids:
        _check_env(name)


def _train_env(cfg: RlConfig, env_id: str, seed: int) -> Any:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    return VecNormalize(make_vec_env(env_id, n_envs=cfg.n_envs, seed=seed), gamma=cfg.gamma)


def make_model(cfg: RlConfig, opt_name: str, env: Any, seed: int) -> Any:
    """SB3's PPO on ``env`` with the policy's optimizer ``opt_name`` (lr, betas, eps, decay from the config)."""
    from stable_baselines3 import PPO

    spec = cfg.optim[opt_name]
    kwargs = {"name": opt_name, "betas": tuple(spec.betas), "eps": spec.eps, "weight_decay": spec.weight_decay}
    return PPO("MlpPolicy", env, learning_rate=spec.lr, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
               n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
               ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm,
               policy_kwargs={"optimizer_class": sb3_optimizer, "optimizer_kwargs": kwargs},
               seed=seed, device="cpu", verbose=0)


def _save(model: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    model.save(buf)  # policy and optimizer state_dicts, num_timesteps, hyper-parameters
    return {"steps": int(model.num_timesteps), "model": buf.getvalue(), "vecnormalize": pickle.dumps(model.get_env())}


def _load(cfg: RlConfig, state: dict[str, Any], env_id: str, seed: int) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = pickle.loads(state["vecnormalize"])  # what VecNormalize.load does, from bytes
    env.set_venv(make_vec_env(env_id, n_envs=cfg.n_envs, seed=seed + 7919 * state["steps"]))
    return PPO.load(io.BytesIO(state["model"]), env=env, device="cpu")


def evaluate(model: Any, cfg: RlConfig, env_id: str, seed: int) -> list[float]:
    """Undiscounted returns of deterministic episodes with the training statistics frozen, raw reward."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), training=False, norm_reward=False)
    env.obs_rms = model.get_env().obs_rms.copy()
    returns, _ = evaluate_policy(model, env, n_eval_episodes=cfg.eval_episodes, deterministic=True,
                                 return_episode_rewards=True)
    env.close()
    return [float(r) for r in returns]


def run(cfg: RlConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Train one PPO agent (``unit.optimizer``, ``unit.seed`` on the unit's env), then evaluate it."""
    env_id = dict(unit.setting)["env"]
    saved = ctx.resume()
    model = (_load(cfg, saved, env_id, unit.seed) if saved is not None
             else make_model(cfg, unit.optimizer, _train_env(cfg, env_id, unit.seed), unit.seed))
    rollout = cfg.n_envs * cfg.n_steps
    ctx.progress(cfg.total_steps, model.num_timesteps)
    t0 = time.time()
    while model.num_timesteps < cfg.total_steps:
        model.learn(rollout, reset_num_timesteps=False)
        recent = [ep["r"] for ep in model.ep_info_buffer]  # Monitor's raw returns, last 100 episodes
        ctx.log(model.num_timesteps, train_return=float(np.mean(recent)) if recent else None)
        ctx.checkpoint(_save(model), force=model.num_timesteps >= cfg.total_steps)
    returns = evaluate(model, cfg, env_id, seed=10_000 + unit.seed)
    model.get_env().close()
    return {"env": env_id, "steps": int(model.num_timesteps), "eval_return": float(np.mean(returns)),
            "eval_returns": returns, "train_seconds": round(time.time() - t0, 1)}


def summarize(cfg: RlConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (env, optimizer): mean, 95% interval and std over seeds of the evaluation return, with the
    difference adopt minus that optimizer paired by seed (its mean, 95% interval, whether it excludes 0)."""
    rows = []
    for (env,), recs in report.group(records, "env").items():
        env_rows = []
        for (name,), sub in report.group(recs, "optimizer").items():
            ret = report.stats([r["eval_return"] for r in sub])
            env_rows.append({"env": env, "optimizer": name, "steps": sub[0]["steps"], "seeds": ret.n,
                             "eval_return": ret.mean, "ci95": ret.ci95, "std": ret.std})
        rows += report.with_paired(env_rows, recs, ["eval_return"])
    return rows


def plot(cfg: RlConfig, results: list[RunResult], out: Path) -> None:
    """Training return (Monitor's, mean of the last 100 episodes) over environment steps, one panel per env."""
    envs = list(dict.fromkeys(dict(r.unit.setting)["env"] for r in results))
    fig, axes = report.figure(1, len(envs), size=(4.6 * len(envs), 3.2))
    for ax, env in zip(axes[0], envs, strict=True):
        colors: dict[str, Any] = {}
        for res in results:
            if dict(res.unit.setting)["env"] != env:
                continue
            pts = [(h["step"], h["train_return"]) for h in res.history if h.get("train_return") is not None]
            if not pts:
                continue
            name = res.unit.optimizer
            (line,) = ax.plot(*zip(*pts, strict=True), lw=1.0, alpha=0.7, color=colors.get(name),
                              label=None if name in colors else name)
            colors.setdefault(name, line.get_color())
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return\n(sum of rewards, last 100 episodes)", fontsize=9)
        ax.set_title(f"SB3 PPO on {env}, {cfg.seeds} seeds", fontsize=9)
        ax.legend(fontsize=8)
    report.save(fig, out / "rl.png")


EXPERIMENT = Experiment(
    name="rl",
    summary=("Stable-Baselines3 PPO on MuJoCo HalfCheetah-v5 and Ant-v5, adam vs adopt, 8 seeds, eval return "
             "and paired difference; scaled down: 65,536 steps per run (--quick: Pendulum-v1)"),
    paper_scale="paper: 1M steps per run: --set total_steps=999424 (about 15x the default's time)",
    requires=(("gymnasium", "pip install 'adoptim-repro[rl]'"),
              ("stable_baselines3", "pip install 'adoptim-repro[rl]'")),
    preflight=preflight,
    config=RlConfig,
    quick={"env_ids": ("Pendulum-v1",), "total_steps": 1024, "n_envs": 2, "n_steps": 256, "seeds": 2,
           "eval_episodes": 2},
    units=units,
    run=run,
    summarize=summarize,
    plot=plot,
)

