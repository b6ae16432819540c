"""The training loop shared by the language-model experiments (``gpt``, ``llama``).

Data parallelism: every process draws the same global batch (a pure function of seed and step) and
keeps its own slice; the loss of each slice is a token *sum* divided by the global token count times
the world size, so DDP's gradient average equals the single-process gradient of the global batch,
exactly up to float rounding, also when slices hold different numbers of target tokens.

Resume: the state (model, optimizer, step, history) goes to the runner's checkpoint every
``save_every`` steps (the runner saves it when its interval has passed); because batches depend only on
(seed, step), a resumed run continues the very same stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import Dist
from .schedule import Schedule, WarmupCosine

__all__ = [
    "IGNORE",
    "LoopSettings",
    "count_spikes",
    "mean_loss",
    "spike_steps",
    "token_loss_sum",
    "train_loop",
]


def spike_steps(losses: Sequence[float], factor: float = 1.5, window: int = 50) -> list[int]:
    """Steps where a loss spike starts: the loss exceeds ``factor`` times the median of the ``window``
    losses before it, and the previous step did not (a spike lasting several steps counts once).

    The first ``window`` steps are never spikes (no median yet). Non-finite losses count as above.
    """
    if factor <= 1 or window < 1:
        raise ValueError(f"spike factor must be > 1 and window >= 1, got {factor}, {window}")
    x = np.asarray(losses, dtype=np.float64)
    starts, above_prev = [], False
    for i in range(window, len(x)):
        above = not np.isfinite(x[i]) or x[i] > factor * np.median(x[i - window : i])
        if above and not above_prev:
            starts.append(i)
        above_prev = above
    return starts


def count_spikes(losses: Sequence[float], factor: float = 1.5, window: int = 50) -> int:
    """The number of loss spikes in ``losses`` (see :func:`spike_steps`)."""
    return len(spike_steps(losses, factor, window))


@dataclass
class LoopSettings:
    """What the loop needs besides model, optimizer, data and the run context."""

    steps: int
    lr: WarmupCosine
    grad_clip: float = 0.0
    eval_every: int = 0
    save_every: int = 50


# A batch function maps a step to this rank's micro-batches, each (inputs, targets) of token ids with
# IGNORE in targets that carry no loss; a forward function maps (model, inputs) to logits.
BatchFn = Callable[[int], list[tuple[Tensor, Tensor]]]
ForwardFn = Callable[[nn.Module, Tensor], Tensor]
IGNORE = -100


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy over the target tokens that are not ``IGNORE``."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def mean_loss(model: nn.Module, forward: ForwardFn, micro: list[tuple[Tensor, Tensor]], d: Dist) -> float:
    """Token-mean loss over the micro-batches of all ranks."""
    model.eval()
    s, n = 0.0, 0
    for x, y in micro:
        s += float(token_loss_sum(forward(model, x), y))
        n += int((y != IGNORE).sum())
    s, n = d.all_sum([s, n])
    return s / max(n, 1)


def train_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: BatchFn,
    forward: ForwardFn,
    evaluate: Callable[[], float] | None,
    settings: LoopSettings,
    ctx: Any,
) -> dict[str, list[float]]:
    """Train ``settings.steps`` steps under the runner's context ``ctx`` (resume, checkpoints, metric
    lines, progress) and return the history: train loss and lr per step, eval losses.

    ``model`` may be wrapped in DistributedDataParallel; checkpoints hold the unwrapped module.
    """
    d: Dist = ctx.dist
    inner = model.module if hasattr(model, "module") else model
    hist: dict[str, list[float]] = {"train_loss": [], "lr": [], "eval_step": [], "eval_loss": []}
    start = 0
    schedule = Schedule(opt, settings.lr)
    state = ctx.resume()
    if state is not None:
        inner.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, hist = state["step"], state["history"]
        schedule.load_state_dict(state.get("schedule", {"last_epoch": start}))
    ctx.progress(settings.steps, start)
    for step in range(start, settings.steps):
        lr = schedule.get_last_lr()[0]
        micro = batches(step)
        total = d.all_sum([sum(int((y != IGNORE).sum()) for _, y in micro)])[0]
        loss_sum = 0.0
        model.train()
        for i, (x, y) in enumerate(micro):
            # Gradients are all-reduced once, after the last micro-batch.
            last = i == len(micro) - 1
            with model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext():
                s = token_loss_sum(forward(model, x), y)
                (s * (d.world_size / total)).backward()
            loss_sum += float(s.detach())
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(inner.parameters(), settings.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        train_loss = d.all_sum([loss_sum])[0] / total
        hist["train_loss"].append(train_loss)
        hist["lr"].append(lr)
        done = step + 1
        metrics = {"loss": train_loss, "lr": lr}
        due = settings.eval_every and (done % settings.eval_every == 0 or done == settings.steps)
        if evaluate is not None and due:
            metrics["val_loss"] = evaluate()
            hist["eval_step"].append(done)
            hist["eval_loss"].append(metrics["val_loss"])
        ctx.log(done, **metrics)
        if done % settings.save_every == 0:
            snapshot = {"model": inner.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict(),
                        "step": done, "history": hist}
            ctx.checkpoint(snapshot)
    return hist
