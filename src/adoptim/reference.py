"""A literal, float64, per-element transcription of ADOPT: the ground truth of the tests.

Nothing here uses torch arithmetic: every element is updated with Python floats (IEEE float64), one at a
time, in exactly the order of the algorithm box (Taniguchi et al., 2024, Algorithm 1 with the authors'
clipping). It is slow by design and meant for small tensors.

Per parameter, with gradient ``g`` (negated when ``maximize``; plus ``wd * p`` with coupled L2 decay)::

    first call (step == 0):  v = g * g            # no parameter update, m stays 0, no decoupled decay
    every later call, t = step = 1, 2, ...:
        p = p * (1 - lr * wd)                      # decoupled weight decay only
        n = g / max(sqrt(v), eps)                  # v = v_{t-1}: it does not contain g yet
        n = clamp(n, -t ** gamma, t ** gamma)      # gamma = clip_exponent; None: no clipping
        m = beta1 * m + (1 - beta1) * n
        p = p - lr * m
        v = beta2 * v + (1 - beta2) * g * g
    step += 1

Complex parameters are treated as pairs of reals (``torch.view_as_real``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["adopt_step", "ReferenceADOPT", "ReferenceState"]


def adopt_step(
    p: list[float],
    g: list[float],
    m: list[float],
    v: list[float],
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    clip_exponent: float | None = 0.25,
    maximize: bool = False,
) -> tuple[list[float], list[float], list[float], int]:
    """One ADOPT step on flat lists of Python floats; returns new ``(p, m, v, step)``."""
    if not (len(p) == len(g) == len(m) == len(v)):
        raise ValueError("p, g, m and v must have the same length")
    p, m, v = list(p), list(m), list(v)
    t = step
    for i in range(len(p)):
        gi = -g[i] if maximize else g[i]
        if weight_decay != 0.0 and not decoupled_weight_decay:
            gi = gi + weight_decay * p[i]
        if t == 0:
            v[i] = gi * gi
            continue
        if weight_decay != 0.0 and decoupled_weight_decay:
            p[i] = p[i] * (1.0 - lr * weight_decay)
        n = gi / max(math.sqrt(v[i]), eps)
        if clip_exponent is not None:
            bound = float(t) ** clip_exponent
            n = min(max(n, -bound), bound)
        m[i] = beta1 * m[i] + (1.0 - beta1) * n
        p[i] = p[i] - lr * m[i]
        v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi
    return p, m, v, step + 1


def _flat(t: torch.Tensor) -> list[float]:
    if t.is_complex():
        t = torch.view_as_real(t)
    return [float(x) for x in t.detach().to(torch.float64).reshape(-1).tolist()]


def _unflat(values: list[float], like: torch.Tensor) -> torch.Tensor:
    out = torch.tensor(values, dtype=torch.float64)
    if like.is_complex():
        return torch.view_as_complex(out.reshape(*like.shape, 2)).to(torch.complex128)
    return out.reshape(like.shape)


@dataclass
class ReferenceState:
    step: int = 0
    m: list[float] = field(default_factory=list)
    v: list[float] = field(default_factory=list)


class ReferenceADOPT:
    """Runs :func:`adopt_step` over torch tensors, keeping float64 copies of parameters and state.

    ``step(grads)`` takes one gradient (or ``None``: the parameter is skipped, as torch.optim does) per
    parameter. ``params()``/``exp_avg(i)``/``exp_avg_sq(i)`` return float64 (or complex128) tensors.
    """

    def __init__(self, params: list[torch.Tensor], **hyper: object) -> None:
        self._like = [p.detach().clone() for p in params]
        self._p = [_flat(p) for p in params]
        self._state = [ReferenceState() for _ in params]
        self.hyper = hyper

    def step(self, grads: list[torch.Tensor | None]) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            st = self._state[i]
            if st.step == 0:
                st.m = [0.0] * len(self._p[i])
                st.v = [0.0] * len(self._p[i])
            self._p[i], st.m, st.v, st.step = adopt_step(
                self._p[i], _flat(g), st.m, st.v, st.step, **self.hyper
            )

    def params(self) -> list[torch.Tensor]:
        return [_unflat(p, like) for p, like in zip(self._p, self._like)]

    def steps(self) -> list[int]:
        return [s.step for s in self._state]

    def exp_avg(self, i: int) -> torch.Tensor:
        return _unflat(self._state[i].m, self._like[i])

    def exp_avg_sq(self, i: int) -> torch.Tensor:
        return _unflat(self._state[i].v, self._like[i])
