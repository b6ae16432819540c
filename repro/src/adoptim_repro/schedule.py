"""The one learning-rate schedule of the experiments: linear warm-up, then cosine decay.

``WarmupCosine`` is the schedule as plain data (so a config or checkpoint can hold it) and a function
of the step; ``Schedule`` is a :class:`torch.optim.lr_scheduler.LRScheduler` that sets every param
group's lr to it, with torch's ``step()``, ``get_last_lr()`` and a ``state_dict()`` that resumes.

The three experiments that use it, and how their settings read:

- language models (``lm_train``): ``WarmupCosine(lr, steps, warmup, floor=min_ratio)``, warm-up
  ``lr * (t + 1) / warmup`` (the peak is reached at the last warm-up step);
- ImageNet's Swin recipe: ``WarmupCosine(lr, steps, warmup, floor=min_lr / lr, start=warmup_lr,
  reach_peak_after_warmup=True)``, warm-up ``start + (lr - start) * t / warmup``;
- CIFAR-10: ``WarmupCosine(lr, steps)``: cosine from ``lr`` to 0, no warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """lr at step ``t`` (0-based): warm-up over ``warmup`` steps, then cosine from ``peak`` to
    ``floor * peak`` at step ``steps`` (and held there after it)."""

    peak: float
    steps: int
    warmup: int = 0
    floor: float = 0.0  # the final lr as a fraction of peak
    start: float = 0.0  # the lr the warm-up starts from
    reach_peak_after_warmup: bool = False  # warm-up t / warmup (peak at step warmup), else (t + 1) / warmup

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            done = t if self.reach_peak_after_warmup else t + 1
            return self.start + (self.peak - self.start) * done / self.warmup
        progress = min(1.0, (t - self.warmup) / max(1, self.steps - self.warmup))
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's lr to ``fn(t)``: ``fn(0)`` when built, ``fn(t)`` after the t-th ``step()``.

    Build it before loading the optimizer's state; ``load_state_dict`` puts the lr back for the saved
    step, so a resumed run continues with the lr it would have had.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fn: WarmupCosine) -> None:
        self.fn = fn
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.fn(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """The step reached (the schedule itself comes from the config)."""
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        lr = self.fn(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)
