"""Optimizers by name: the names an experiment config lists, and the factory that builds them.

``adam``, ``adamw``, ``amsgrad`` and ``adamax`` are torch.optim's; ``adopt`` is :class:`adoptim.ADOPT`
with the clipped default, ``adopt-noclip`` the paper's unclipped Algorithm 1 (``clip_exponent=None``),
``adoptw`` ADOPT with decoupled weight decay, and ``adopt-8bit`` and ``adopt-bf16`` ``adopt`` with its
moments stored in 8 bits or in bfloat16 (``state_precision``, the library's defaults for block and minimum
size). ``weight_decay`` is L2 in the gradient for all of them except ``adamw`` and ``adoptw``, where it is
decoupled. A low-precision variant's settings start as ``adopt``'s in each experiment (the same lr, betas,
eps and decay), and are then its own (``--set adopt-8bit.lr=...``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from adoptim import ADOPT

# ``adopt`` with low-precision state: name -> ADOPT's ``state_precision``.
LOW_PRECISION = {"adopt-8bit": "8bit", "adopt-bf16": "bfloat16"}
OPTIMIZERS = ("adam", "adamw", "amsgrad", "adamax", "adopt", "adopt-noclip", "adoptw", *LOW_PRECISION)


@dataclass(frozen=True)
class OptimSpec:
    """One optimizer's hyper-parameters in an experiment config (``--set NAME.lr=...``)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")


def default_specs(**overrides: OptimSpec) -> dict[str, OptimSpec]:
    """A spec for every optimizer: each library's defaults, ADOPT's own eps and beta2, then overrides.

    The low-precision variants take ``adopt``'s spec (after its override) unless given their own.
    """
    specs = {name: OptimSpec() for name in OPTIMIZERS}
    specs["adamax"] = OptimSpec(lr=2e-3)
    for name in ("adopt", "adopt-noclip", "adoptw"):
        specs[name] = OptimSpec(betas=(0.9, 0.9999), eps=1e-6)
    specs.update(overrides)
    for name in LOW_PRECISION:
        if name not in overrides:
            specs[name] = specs["adopt"]
    return specs


def make_optimizer(name: str, params: Iterable[Any], spec: OptimSpec) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``params`` with the settings in ``spec``."""
    kw: dict[str, Any] = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps,
                              weight_decay=spec.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, **kw)
    if name == "amsgrad":
        return torch.optim.Adam(params, amsgrad=True, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    if name == "adamax":
        return torch.optim.Adamax(params, **kw)
    if name == "adopt":
        return ADOPT(params, **kw)
    if name == "adopt-noclip":
        return ADOPT(params, clip_exponent=None, **kw)
    if name == "adoptw":
        return ADOPT(params, decoupled_weight_decay=True, **kw)
    if name in LOW_PRECISION:
        return ADOPT(params, state_precision=LOW_PRECISION[name], **kw)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (schedules here are plain functions of the step, so resumable)."""
    for group in opt.param_groups:
        group["lr"] = lr
