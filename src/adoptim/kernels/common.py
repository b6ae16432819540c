"""Pieces the kernel wrappers and the dispatcher share."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["PLAIN_TENSOR_TYPES", "decay_scale", "dtensor_type", "share_memory", "state_holds"]

# Plain tensors and parameters: no tensor subclass (DTensor and the like), whose data pointers are not theirs.
PLAIN_TENSOR_TYPES = frozenset({Tensor, torch.nn.Parameter})


def decay_scale(lr: float | Tensor, weight_decay: float, dtype: torch.dtype) -> float | Tensor:
    """``lr * weight_decay`` for parameters of ``dtype``, in the wider of the lr's and the parameters' precision.

    A float32 tensor lr would otherwise round the product to float32 before it decays float64 parameters
    (a relative error of 6e-8 per step, which a float lr or the fused kernel does not have).
    """
    if isinstance(lr, Tensor):
        real = dtype.to_real() if dtype.is_complex else dtype
        return lr.to(torch.promote_types(lr.dtype, real)) * weight_decay
    return lr * weight_decay


def dtensor_type() -> type | None:
    """``DTensor`` if torch.distributed.tensor was imported (no DTensor can exist otherwise), else None."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def state_holds(param: Tensor, state: Tensor) -> bool:
    """Whether a state tensor's dtype holds its parameter's values: the parameter's dtype or a wider one.

    Wider state (float32 state of a parameter cast to float16 after some steps) is computed in the
    state's precision by type promotion; narrower state would fail inside a kernel, half-way through.
    """
    return state.dtype is param.dtype or (
        state.is_complex() == param.is_complex() and torch.promote_types(param.dtype, state.dtype) == state.dtype
    )


def share_memory(tensors: Iterable[Tensor]) -> bool:
    """Whether the memory of two tensors with elements overlaps: a parameter listed twice (torch.optim
    only warns about it), or parameters that are views of one buffer.

    A fused kernel would update both at once, in two threads or programs, where the for-loop kernel
    updates them one after the other. Each tensor spans the bytes from its first to its last element;
    views that interleave without sharing an element (``buf[::2]`` and ``buf[1::2]``) count as
    overlapping, which only costs them the fused kernel.
    """
    spans = []
    for t in tensors:
        if t.numel():  # empty tensors may share an address
            lo = t.data_ptr()
            last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            spans.append((lo, lo + (last + 1) * t.element_size()))
    spans.sort()
    return any(lo < hi for (_, hi), (lo, _) in zip(spans, spans[1:]))
