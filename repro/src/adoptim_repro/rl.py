"""Deep RL: PPO on MuJoCo, Adam against ADOPT (the paper's deep reinforcement learning experiment).

Claim tested: with everything else fixed (the agent and its hyper-parameters), replacing Adam by ADOPT
gives an agent with an equal or higher return on MuJoCo locomotion (the paper shows HalfCheetah and
Ant). Here: a compact PPO of our own in the CleanRL style (one file of plain torch, no RL library;
the default PPO settings of Stable-Baselines3 and CleanRL), gymnasium's ``HalfCheetah-v5`` by default,
``Pendulum-v1`` with ``--quick``. The metric is the mean undiscounted return of deterministic evaluation episodes at the
end of training (frozen observation statistics), reported as mean and 95% interval over seeds.

Run: ``adoptim rl`` (HalfCheetah-v5, 2 optimizers x 3 seeds x 150k steps; ``adoptim rl --quick`` proves the
code path on Pendulum-v1, not the claim).

Scale: a full-length MuJoCo PPO run is 1M environment steps; the default here trains 150k per run
(``adoptim list`` gives the measured run time), where PPO on HalfCheetah is still early in learning.

Distributed: under ``torchrun`` each process steps its share of the ``envs`` parallel environments and
trains on its share of every minibatch; gradients are averaged across processes before clipping, so
the global rollout and minibatch sizes are those of a single-process run. Observation and reward
statistics stay per process (as in CleanRL's multi-GPU PPO), so results differ from a 1-process run.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import report
from .config import ConfigError
from .optimizers import OptimSpec, default_specs, make_optimizer, set_lr
from .runner import Experiment, RunContext, RunResult, Unit, seed_units


class RunningMeanStd:
    """Running mean and variance of a stream of vectors (the parallel-merge form of Welford's method)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        b_mean, b_var, b_n = x.mean(0), x.var(0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_n
        self.mean = self.mean + delta * b_n / total
        m2 = self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / total
        self.var, self.count = m2 / total, total

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load(self, s: dict[str, Any]) -> None:
        self.mean, self.var, self.count = np.asarray(s["mean"]), np.asarray(s["var"]), float(s["count"])


def _layer(i: int, o: int, std: float) -> nn.Linear:
    lin = nn.Linear(i, o)
    nn.init.orthogonal_(lin.weight, std)
    nn.init.zeros_(lin.bias)
    return lin


class Agent(nn.Module):
    """Separate actor (Gaussian, state-independent log std) and critic MLPs, orthogonally initialised."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64) -> None:
        super().__init__()
        r2 = math.sqrt(2)
        self.critic = nn.Sequential(_layer(obs_dim, hidden, r2), nn.Tanh(), _layer(hidden, hidden, r2),
                                    nn.Tanh(), _layer(hidden, 1, 1.0))
        self.actor_mean = nn.Sequential(_layer(obs_dim, hidden, r2), nn.Tanh(), _layer(hidden, hidden, r2),
                                        nn.Tanh(), _layer(hidden, act_dim, 0.01))
        self.actor_logstd = nn.Parameter(torch.zeros(act_dim))

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def dist(self, obs: Tensor) -> torch.distributions.Normal:
        mean = self.actor_mean(obs)
        return torch.distributions.Normal(mean, self.actor_logstd.expand_as(mean).exp(), validate_args=False)


class Normalizers:
    """Observation standardisation and reward scaling by the running std of the discounted return.

    One instance serves ``n`` parallel environments (one discounted return each), as gymnasium's
    ``NormalizeObservation`` and ``NormalizeReward`` wrappers would around a vector environment.
    """

    def __init__(self, obs_dim: int, n: int, gamma: float) -> None:
        self.obs = RunningMeanStd((obs_dim,))
        self.ret = RunningMeanStd(())
        self.gamma = gamma
        self.discounted = np.zeros(n)

    def observation(self, o: np.ndarray, update: bool) -> np.ndarray:
        if update:
            self.obs.update(o)
        return np.clip((o - self.obs.mean) / np.sqrt(self.obs.var + 1e-8), -10, 10).astype(np.float32)

    def reward(self, r: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.discounted = self.discounted * self.gamma + r
        self.ret.update(self.discounted)
        self.discounted[done] = 0.0
        return np.clip(r / math.sqrt(self.ret.var + 1e-8), -10, 10)


def evaluate(env: Any, agent: Agent, norm: Normalizers, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes with the mean action and frozen normalisers."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        total, done = 0.0, False
        while not done:
            x = torch.from_numpy(norm.observation(obs[None], update=False)[0])
            with torch.no_grad():
                act = agent.actor_mean(x).numpy()
            obs, r, term, trunc, _ = env.step(np.clip(act, env.action_space.low, env.action_space.high))
            total += float(r)
            done = term or trunc
        returns.append(total)
    return returns


def _gae(rew: np.ndarray, val: np.ndarray, done: np.ndarray, next_val: np.ndarray, gamma: float,
         lam: float) -> np.ndarray:
    """Generalised advantage estimates for (T, N) arrays; ``done[t]`` ends the episode after step t."""
    adv = np.zeros_like(rew)
    last = np.zeros(rew.shape[1])
    for t in reversed(range(rew.shape[0])):
        nv = next_val if t == rew.shape[0] - 1 else val[t + 1]
        keep = 1.0 - done[t]
        last = rew[t] + gamma * nv * keep - val[t] + gamma * lam * keep * last
        adv[t] = last
    return adv


@dataclass
class RlConfig:
    """PPO on one gymnasium environment; PPO settings are Stable-Baselines3's and CleanRL's defaults."""

    env: str = "HalfCheetah-v5"
    """gymnasium environment id (continuous actions, flat observations)"""
    total_steps: int = 150_000
    """environment steps per run"""
    rollout_steps: int = 2048
    """environment steps per PPO iteration (all environments)"""
    envs: int = 4
    """parallel environments (split over processes)"""
    minibatches: int = 32
    """minibatches per update epoch"""
    update_epochs: int = 10
    """passes over each rollout"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO's ratio clipping"""
    vf_coef: float = 0.5
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping threshold"""
    anneal_lr: bool = True
    """decay the lr linearly to 0 over the run"""
    hidden: int = 64
    """units of each of the two hidden layers (actor and critic)"""
    eval_episodes: int = 5
    """deterministic evaluation episodes at the end"""
    seeds: int = 3
    """seeds 0..N-1 are run for each optimizer (mean and 95% interval over them)"""
    optimizers: tuple[str, ...] = ("adam", "adopt")
    """the optimizers compared, by name (adam, adamw, amsgrad, adamax, adopt, adopt-noclip, adoptw, adopt-8bit,
    adopt-bf16; the last two are adopt with 8-bit or bfloat16 state)"""
    optim: dict[str, OptimSpec] = field(default_factory=lambda: default_specs(
        adam=OptimSpec(lr=3e-4, betas=(0.9, 0.999), eps=1e-5),
        adopt=OptimSpec(lr=3e-4, betas=(0.9, 0.9999), eps=1e-6)))
    """each optimizer's lr, betas, eps and weight_decay, set as NAME.lr=... (e.g. adopt.lr=3e-3)"""

    def validate(self) -> None:
        for key in ("total_steps", "rollout_steps", "envs", "minibatches", "update_epochs", "hidden",
                    "eval_episodes"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {getattr(self, key)}")
        if self.rollout_steps % self.envs or self.rollout_steps % self.minibatches:
            raise ValueError(f"config key 'rollout_steps' ({self.rollout_steps}) must be divisible by "
                             f"'envs' ({self.envs}) and 'minibatches' ({self.minibatches})")
        if self.total_steps < self.rollout_steps:
            raise ValueError(f"config key 'total_steps' ({self.total_steps}) must be >= 'rollout_steps' "
                             f"({self.rollout_steps})")


def _time_limit(env: Any) -> Any:
    """The ``TimeLimit`` wrapper around ``env`` (it counts the episode's steps), or None."""
    while env is not None:
        if hasattr(env, "_elapsed_steps") and hasattr(env, "_max_episode_steps"):
            return env
        env = getattr(env, "env", None)
    return None


def _env_state(env: Any) -> dict[str, Any] | None:
    """A simulator's whole state, to continue an episode in flight exactly; None when it cannot be saved.

    MuJoCo environments keep it in ``MjData``, which pickles whole: the integration state and the
    derived quantities some rewards read before stepping (Ant's torso position). Other environments
    (classic control) keep it in their attributes.
    """
    unwrapped, limit = env.unwrapped, _time_limit(env)
    data = getattr(unwrapped, "data", None)
    try:
        if type(data).__name__ == "MjData":
            sim = {"mjdata": pickle.dumps(data), "np_random": unwrapped.np_random.bit_generator.state}
        else:
            sim = {"attrs": pickle.dumps(vars(unwrapped))}
    except (TypeError, AttributeError, pickle.PicklingError):
        return None
    return {**sim, "elapsed": None if limit is None else limit._elapsed_steps}


def _load_env_state(env: Any, saved: dict[str, Any]) -> None:
    unwrapped, limit = env.unwrapped, _time_limit(env)
    if "mjdata" in saved:
        import mujoco

        mujoco.mj_copyData(unwrapped.data, unwrapped.model, pickle.loads(saved["mjdata"]))
        unwrapped.np_random.bit_generator.state = saved["np_random"]
    else:
        vars(unwrapped).update(pickle.loads(saved["attrs"]))
    if limit is not None:
        limit._elapsed_steps = saved["elapsed"]


def _make_env(name: str) -> Any:
    try:
        import gymnasium as gym
    except ImportError:
        raise ConfigError("the rl experiment needs gymnasium with MuJoCo: pip install 'gymnasium[mujoco]'") from None
    try:
        env = gym.make(name)
    except gym.error.Error as e:
        raise ConfigError(f"config key 'env': gymnasium cannot make {name!r} ({e})") from None
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise ConfigError(f"config key 'env': {name!r} needs a continuous (Box) action space and flat "
                         "observations for this PPO")
    return env


def preflight(cfg: RlConfig) -> None:
    """Make the environment once before any unit runs (a missing simulator is refused first)."""
    _make_env(cfg.env).close()


class PPO:
    """One PPO training run of one process: its environments, agent, optimizer and statistics."""

    def __init__(self, cfg: RlConfig, opt_name: str, seed: int, rank: int = 0, world: int = 1) -> None:
        if cfg.envs % world:
            raise ValueError(f"config key 'envs' ({cfg.envs}) must split evenly over {world} processes")
        if (cfg.rollout_steps // world) % cfg.minibatches:
            raise ValueError(f"config key 'minibatches' ({cfg.minibatches}) must divide each process's "
                             f"{cfg.rollout_steps // world} transitions")
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world
        self.n_envs = cfg.envs // world
        self.envs = [_make_env(cfg.env) for _ in range(self.n_envs)]
        space = self.envs[0].action_space
        self.low, self.high = space.low, space.high
        self.obs_dim, self.act_dim = self.envs[0].observation_space.shape[0], space.shape[0]
        torch.manual_seed(seed)  # the same initial agent on every process
        self.agent = Agent(self.obs_dim, self.act_dim, cfg.hidden)
        self.lr = cfg.optim[opt_name].lr
        self.opt = make_optimizer(opt_name, self.agent.parameters(), cfg.optim[opt_name])
        self.norm = Normalizers(self.obs_dim, self.n_envs, cfg.gamma)
        self.rng = np.random.default_rng([seed, rank])
        self.iteration = 0
        self.iterations = cfg.total_steps // cfg.rollout_steps
        self.episodes: list[tuple[int, float]] = []  # (global step at its end, return), this process
        self._start_episodes()

    def _start_episodes(self, update: bool = True) -> None:
        first = self.rank * self.n_envs
        seeds = [self.seed * 100_003 + self.iteration * 1009 + first + k for k in range(self.n_envs)]
        self.raw = np.stack([e.reset(seed=s)[0] for e, s in zip(self.envs, seeds, strict=True)])
        self.obs = self.norm.observation(self.raw, update=update)
        self.ep_ret = np.zeros(self.n_envs)

    # -- resume -----------------------------------------------------------------------------------
    def _local_state(self) -> dict[str, Any]:
        """What differs between processes: statistics, random stream, finished episodes, and the
        episodes in flight (each simulator's state, its last observation and running return)."""
        return {"obs_rms": self.norm.obs.state(), "ret_rms": self.norm.ret.state(),
                "rng": self.rng.bit_generator.state, "episodes": self.episodes,
                "envs": [_env_state(e) for e in self.envs], "raw": self.raw.copy(), "obs": self.obs.copy(),
                "ep_ret": self.ep_ret.copy(), "discounted": self.norm.discounted.copy()}

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly; every process's part (a collective under
        torchrun: call it on every process)."""
        local = self._local_state()
        if self.world > 1:
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.world
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"iteration": self.iteration, "agent": self.agent.state_dict(), "opt": self.opt.state_dict(),
                "ranks": ranks}

    def load(self, st: dict[str, Any]) -> None:
        """Continue from ``state()`` exactly, episodes in flight included. A checkpoint without
        simulator states (another world size, or an older version) restarts the episodes in flight."""
        self.iteration = st["iteration"]
        self.agent.load_state_dict(st["agent"])
        self.opt.load_state_dict(st["opt"])
        ranks = st.get("ranks") or [st]  # older checkpoints held process 0's part at the top level
        local = ranks[self.rank] if len(ranks) == self.world else ranks[0]
        self.norm.obs.load(local["obs_rms"])
        self.norm.ret.load(local["ret_rms"])
        self.rng.bit_generator.state = local["rng"]
        self.episodes = [tuple(e) for e in local["episodes"]]
        envs = local.get("envs")
        if len(ranks) == self.world and envs is not None and all(e is not None for e in envs):
            for env, saved in zip(self.envs, envs, strict=True):
                _load_env_state(env, saved)
            self.raw, self.obs, self.ep_ret = local["raw"].copy(), local["obs"].copy(), local["ep_ret"].copy()
            self.norm.discounted = local["discounted"].copy()
        else:
            self._start_episodes(update=False)  # the statistics stay exactly as saved

    # -- one iteration: a rollout and the PPO update ------------------------------------------------
    def _rollout(self) -> tuple[np.ndarray, ...]:
        cfg, n = self.cfg, self.n_envs
        T = cfg.rollout_steps // cfg.envs
        b_obs = np.zeros((T, n, self.obs_dim), np.float32)
        b_act = np.zeros((T, n, self.act_dim), np.float32)
        b_logp, b_rew, b_done, b_val = (np.zeros((T, n)) for _ in range(4))
        base = self.iteration * cfg.rollout_steps
        for t in range(T):
            with torch.no_grad():
                x = torch.from_numpy(self.obs)
                mean = self.agent.actor_mean(x).numpy()
                b_val[t] = self.agent.value(x).numpy()
                std = self.agent.actor_logstd.exp().numpy()
            noise = self.rng.standard_normal(mean.shape)
            act = (mean + std * noise).astype(np.float32)
            b_logp[t] = (-0.5 * noise**2 - np.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
            b_obs[t], b_act[t] = self.obs, act
            rew, done = np.zeros(n), np.zeros(n, bool)
            for k, env in enumerate(self.envs):
                o, r, term, trunc, _ = env.step(np.clip(act[k], self.low, self.high))
                rew[k], done[k] = r, term or trunc
                self.ep_ret[k] += r
                if done[k]:
                    self.episodes.append((base + (t + 1) * cfg.envs, float(self.ep_ret[k])))
                    self.ep_ret[k] = 0.0
                    o, _ = env.reset()
                self.raw[k] = o
            # A time-limit truncation ends the episode in the advantage estimate, as CleanRL's PPO does
            # (Stable-Baselines3 instead bootstraps from the value of the truncated state).
            b_rew[t], b_done[t] = self.norm.reward(rew, done), done
            self.obs = self.norm.observation(self.raw, update=True)
        with torch.no_grad():
            next_val = self.agent.value(torch.from_numpy(self.obs)).numpy()
        adv = _gae(b_rew, b_val, b_done, next_val, cfg.gamma, cfg.gae_lambda)
        return b_obs, b_act, b_logp, adv, adv + b_val

    def iterate(self) -> None:
        """Collect one rollout and run the clipped-surrogate update on it."""
        cfg = self.cfg
        if cfg.anneal_lr:
            set_lr(self.opt, self.lr * (1.0 - self.iteration / self.iterations))
        b_obs, b_act, b_logp, adv_np, ret_np = self._rollout()
        flat = lambda a: torch.as_tensor(a.reshape(-1, *a.shape[2:]), dtype=torch.float32)
        obs, act, logp, adv, ret = (flat(a) for a in (b_obs, b_act, b_logp, adv_np, ret_np))
        n = obs.shape[0]
        mb = n // cfg.minibatches
        params = list(self.agent.parameters())
        for _ in range(cfg.update_epochs):
            perm = torch.from_numpy(self.rng.permutation(n))
            for k in range(0, n, mb):
                i = perm[k:k + mb]
                d = self.agent.dist(obs[i])
                ratio = (d.log_prob(act[i]).sum(-1) - logp[i]).exp()
                a_i = (adv[i] - adv[i].mean()) / (adv[i].std() + 1e-8)
                pg = torch.max(-a_i * ratio, -a_i * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                v_loss = 0.5 * (self.agent.value(obs[i]) - ret[i]).pow(2).mean()
                loss = pg + cfg.vf_coef * v_loss - cfg.ent_coef * d.entropy().sum(-1).mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    _average_grads(params, self.world)
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.opt.step()
        self.iteration += 1

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _average_grads(params: list[Tensor], world: int) -> None:
    import torch.distributed as dist

    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def run(cfg: RlConfig, unit: Unit, ctx: RunContext) -> dict[str, Any]:
    """Train one PPO agent (``unit.optimizer``, ``unit.seed``), then evaluate it."""
    ppo = PPO(cfg, unit.optimizer, unit.seed, ctx.rank, ctx.world_size)
    saved = ctx.resume()
    if saved is not None:
        ppo.load(saved)
    ctx.progress(ppo.iterations * cfg.rollout_steps, ppo.iteration * cfg.rollout_steps)
    t0 = time.time()
    while ppo.iteration < ppo.iterations:
        ppo.iterate()
        recent = [r for _, r in ppo.episodes[-10:]]
        ctx.log(ppo.iteration * cfg.rollout_steps,
                train_return=float(np.mean(recent)) if recent else None)
        ctx.checkpoint(ppo.state(), force=ppo.iteration == ppo.iterations)
    ppo.close()
    eval_env = _make_env(cfg.env)
    returns = evaluate(eval_env, ppo.agent, ppo.norm, cfg.eval_episodes, seed=10_000 + unit.seed)
    eval_env.close()
    return {"env": cfg.env, "steps": ppo.iterations * cfg.rollout_steps,
            "eval_return": float(np.mean(returns)), "eval_returns": returns,
            "train_seconds": round(time.time() - t0, 1)}


def summarize(cfg: RlConfig, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer: mean, 95% interval and standard deviation over seeds of the evaluation return."""
    rows = []
    for (name,), recs in report.group(records, "optimizer").items():
        ret = report.stats([r["eval_return"] for r in recs])
        rows.append({"optimizer": name, "env": cfg.env, "steps": recs[0]["steps"], "seeds": ret.n,
                     "eval_return": ret.mean, "ci95": ret.ci95, "std": ret.std, "min": ret.min, "max": ret.max})
    return rows


def plot(cfg: RlConfig, results: list[RunResult], out: Path) -> None:
    """Training return (mean of the last 10 episodes) over environment steps, each seed a thin line."""
    fig, axes = report.figure(1, 1, size=(5.0, 3.2))
    ax = axes[0][0]
    colors: dict[str, Any] = {}
    for res in results:
        pts = [(h["step"], h["train_return"]) for h in res.history if h.get("train_return") is not None]
        if not pts:
            continue
        name = res.unit.optimizer
        (line,) = ax.plot(*zip(*pts, strict=True), lw=1.0, alpha=0.8, color=colors.get(name),
                          label=None if name in colors else name)
        colors.setdefault(name, line.get_color())
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return (sum of rewards),\nmean of the last 10 episodes", fontsize=9)
    ax.set_title(f"PPO on {cfg.env}, {cfg.seeds} seeds", fontsize=9)
    ax.legend(fontsize=8)
    report.save(fig, out / "rl.png")


EXPERIMENT = Experiment(
    name="rl",
    summary=("PPO (own, CleanRL style) on MuJoCo HalfCheetah-v5, adam vs adopt, eval return over seeds; "
             "scaled down: 150k steps per run (--quick: Pendulum-v1)"),
    paper_scale="paper: HalfCheetah and Ant at full length: --set total_steps=1000000 (--set env=Ant-v5)",
    requires=(("gymnasium", "pip install 'adoptim-repro[rl]'"),),
    preflight=preflight,
    config=RlConfig,
    quick={"env": "Pendulum-v1", "total_steps": 8192, "seeds": 2, "eval_episodes": 2},
    units=seed_units,
    run=run,
    summarize=summarize,
    plot=plot,
)
