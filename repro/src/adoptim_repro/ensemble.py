"""Many runs of one small model at once: seeds stacked on a leading dimension, one optimizer call per step.

An elementwise optimizer (Adam, AMSGrad, ADOPT) applied to stacked parameters is exactly K independent
runs: every element's update reads only that element's gradient and state. So K seeds of an MLP or a
small transformer train as one batched model, at the hardware's speed rather than Python's:

    ens = Ensemble([make_model(seed) for seed in seeds])
    opt = adoptim.ADOPT(ens.parameters(), lr=1e-3)
    logits = ens(x)                      # x: (K, batch, ...), member k sees x[k]
    loss = ens.sum_of_means(loss_fn, logits, y)
    loss.backward()
    opt.step()

The loss is the sum over members of each member's mean loss, so member k's gradient is the one its own
run would compute. ``torch.func.stack_module_state`` stacks the members' parameters and
``torch.func.functional_call`` under ``torch.vmap`` runs one member's forward on each slice. A parameter
shared by two modules of a member (GPT's output layer tied to its token embedding) is stacked once and
given to both, so it stays shared.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

__all__ = ["Ensemble", "ensemble_units", "seed_histories"]


class Ensemble(nn.Module):
    """K copies of one architecture, their parameters stacked: ``parameters()`` has a leading dimension K."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        kinds = {type(m) for m in members}
        if len(kinds) != 1:
            raise ValueError(f"ensemble members must share one architecture, got {sorted(k.__name__ for k in kinds)}")
        params, buffers = stack_module_state(list(members))
        self.size = len(members)
        self.names = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[n].detach().clone()) for n in self.names])
        self.buffer_names = list(buffers)
        for i, name in enumerate(self.buffer_names):
            self.register_buffer(f"buffer{i}", buffers[name].clone())
        # Every other name of a shared parameter (moving the copy below to "meta" would untie it).
        first = dict(members[0].named_parameters())
        canonical = {id(p): n for n, p in first.items()}
        self.aliases = {n: canonical[id(p)] for n, p in members[0].named_parameters(remove_duplicate=False)
                        if n not in first}
        # The architecture, without its own tensors (functional_call supplies each member's).
        self._base = [copy.deepcopy(members[0]).to("meta")]

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member k's parameters and buffers by their names in the member model (views of the stack)."""
        out = {name: p[k] for name, p in zip(self.names, self.stacked, strict=True)}
        out.update({name: getattr(self, f"buffer{i}")[k] for i, name in enumerate(self.buffer_names)})
        return out

    def forward(self, *xs: Tensor) -> Tensor:
        """Member k's output on ``x[k]`` (on ``x[k], y[k], ...`` for a model of several inputs), stacked:
        every input has a leading dimension K."""
        for x in xs:
            if x.shape[0] != self.size:
                raise ValueError(f"the input's leading dimension must be the ensemble size {self.size}, "
                                 f"got {x.shape[0]}")
        base = self._base[0]
        params = dict(zip(self.names, self.stacked, strict=True))
        params.update({alias: params[name] for alias, name in self.aliases.items()})
        buffers = {name: getattr(self, f"buffer{i}") for i, name in enumerate(self.buffer_names)}

        def one(p: dict[str, Tensor], b: dict[str, Tensor], *xk: Tensor) -> Tensor:
            return functional_call(base, (p, b), xk)

        return torch.vmap(one)(params, buffers, *xs)

    @staticmethod
    def sum_of_means(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, target: Tensor) -> Tensor:
        """The sum over members of each member's mean loss (``loss_fn`` with mean reduction, per member)."""
        return torch.vmap(loss_fn)(out, target).sum()


def ensemble_units(cfg: Any) -> list[Any]:
    """An experiment's units when its seeds train as one ensemble: one per optimizer, holding seeds
    0..``cfg.seeds``-1 (its key ``adam-s0-seeds8``; each seed is still its own record)."""
    from .config import ConfigError
    from .runner import Unit

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("config key 'ensemble' trains every seed in one process: under torchrun use "
                          "--set ensemble=false")
    return [Unit(name, 0, (("seeds", cfg.seeds),)) for name in cfg.optimizers]


def seed_histories(results: Sequence[Any]) -> dict[str, list[list[dict[str, Any]]]]:
    """Each optimizer's metric histories, one per seed, from the runner's results: a unit of one seed has
    its own; an ensemble unit's lines hold a list over its seeds, split here into one history per seed."""
    out: dict[str, list[list[dict[str, Any]]]] = {}
    for res in results:
        size = dict(res.unit.setting).get("seeds")
        if size is None:
            out.setdefault(res.unit.optimizer, []).append(res.history)
            continue
        for k in range(size):
            out.setdefault(res.unit.optimizer, []).append(
                [{key: (v[k] if isinstance(v, list) else v) for key, v in line.items()} for line in res.history])
    return out


def train_seeds(ens: Ensemble, opt: torch.optim.Optimizer, ctx: Any, seeds: Sequence[int], steps: int,
                log_every: int, eval_every: int, losses_at: Callable[[int], Tensor],
                evaluate: Callable[[], dict[str, list[float]]], loss_name: str,
                before_step: Callable[[int], None] | None = None, name: str = "",
                stop_on_nonfinite: bool = False) -> list[float]:
    """An experiment's ensemble unit from ``ctx``'s checkpoint (if any) to ``steps``; returns each seed's
    mean loss over the last ``log_every`` steps.

    Each step calls ``before_step(step)`` (a schedule), takes ``losses_at(step)`` (each seed's mean loss,
    shape ``(len(seeds),)``) and steps on their sum: member k's gradient is its own loss's, the members
    share nothing. Every ``log_every`` steps it logs ``loss_name`` (a list over the seeds), with
    ``evaluate()``'s metrics every ``eval_every``, and checkpoints. With ``stop_on_nonfinite`` a seed whose
    loss is NaN or infinite ends the unit with a ``FloatingPointError`` naming it and the step."""
    step, window = 0, []
    saved = ctx.resume()
    if saved is not None:
        ens.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, window = saved["step"], saved["window"]

    def means() -> list[float]:
        return [sum(w[k] for w in window) / len(window) for k in range(len(seeds))]

    ctx.progress(steps, step)
    while step < steps:
        if before_step is not None:
            before_step(step)
        losses = losses_at(step)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        step += 1
        window = (window + [losses.detach().tolist()])[-log_every:]
        bad = [k for k, v in enumerate(window[-1]) if not math.isfinite(v)]
        if stop_on_nonfinite and bad:
            raise FloatingPointError(f"{name} seed {seeds[bad[0]]}: the loss became {window[-1][bad[0]]} at "
                                     f"step {step}")
        if step % log_every == 0 or step == steps:
            metrics: dict[str, Any] = {loss_name: means()}
            if step % eval_every == 0 or step == steps:
                metrics.update(evaluate())
            ctx.log(step, **metrics)
            ctx.checkpoint({"model": ens.state_dict(), "opt": opt.state_dict(), "step": step, "window": window})
    return means()
