"""The scalar update rules of the toy problem, for a tensor of independent runs.

``adam_steps`` and ``adopt_steps`` apply ``len(g)`` consecutive optimizer calls, each followed by the
projection onto [-1, 1], to a tensor ``x`` of independent runs (any shape; ``g`` broadcasts against it).
They are torch.optim Adam / AMSGrad (with bias correction) and :class:`adoptim.ADOPT` written out for
scalars as pure functions, so that ``torch.compile`` can fuse a block of calls into one loop; a test
runs them against the real classes on the same draws. Per-call values (learning rate, bias correction,
clip bound) come as tensors, so a compiled block is reused for every block of the same length.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor


def adam_steps(x: Tensor, m: Tensor, v: Tensor, vmax: Tensor, g: Tensor, g2: Tensor, step_size: Tensor,
               sqrt_c2: Tensor, w2: Tensor, beta1: float, eps: float, amsgrad: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adam calls: ``step_size[i] = lr_i / (1 - beta1^t)``, ``sqrt_c2[i] = sqrt(1 - beta2^t)``,
    ``w2 = 1 - beta2``."""
    for i in range(g.shape[0]):
        m = torch.lerp(m, g[i], 1 - beta1)
        v = torch.lerp(v, g2[i], w2)
        if amsgrad:
            vmax = torch.maximum(vmax, v)
        den = torch.sqrt(vmax if amsgrad else v) / sqrt_c2[i] + eps
        x = torch.clamp(x - step_size[i] * m / den, -1.0, 1.0)
    return x, m, v, vmax


def adopt_steps(x: Tensor, m: Tensor, v: Tensor, g: Tensor, g2: Tensor, lr: Tensor, bound: Tensor,
                w2: Tensor, beta1: float, eps: float, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ADOPT calls after the first (which only sets ``v = g^2``); ``bound[i] = t^clip_exponent``."""
    for i in range(g.shape[0]):
        n = g[i] / torch.clamp(torch.sqrt(v), min=eps)  # v is still v_{t-1}
        if clip:
            n = torch.minimum(torch.maximum(n, -bound[i]), bound[i])
        m = torch.lerp(m, n, 1 - beta1)
        x = torch.clamp(x - lr[i] * m, -1.0, 1.0)
        v = torch.lerp(v, g2[i], w2)
    return x, m, v


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` compiled for fixed shapes (one fused loop per block); ``fn`` itself if compiling fails."""
    fast = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(*args: object) -> object:
        nonlocal fast
        try:
            return fast(*args)
        except Exception as e:  # no C++ compiler, unsupported platform: correct but slower
            warnings.warn(f"torch.compile failed ({type(e).__name__}); running the toy rules eagerly",
                          stacklevel=2)
            fast = fn
            return fn(*args)

    return call
