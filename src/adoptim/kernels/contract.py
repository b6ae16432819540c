"""The kernel contract: one record of a step's arguments, one kernel signature, one dtype table.

Every kernel (``single_tensor``, ``foreach``, ``fused_cpu``, ``triton``) is a function

    kernel(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper, plan=None) -> Sequence[int]

that updates in place the tensors it takes (parameter, momentum, second moment, step counter) and
returns the indices of those it left alone. ``plan`` is an optional :class:`KernelPlan` the caller keeps
between calls; kernels with host-side tables (the fused ones) keep them there, the others ignore it.
The dispatcher (:func:`adoptim.functional.adopt`) alone decides which kernel runs, checks the kernel
choice, runs the for-loop kernel on what a fused kernel left, unscales gradients for the kernels that
do not take AMP's arguments, and falls back when a fused kernel cannot run at all. The for-loop and
foreach kernels take every tensor and return ``()``.

The arithmetic every kernel implements is :mod:`adoptim.reference`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "FUSED_DEVICES", "FUSED_DTYPES", "FUSED_REAL_DTYPES", "Hyper", "Kernel", "KernelPlan", "check_kernel_choice",
    "real_dtype",
]

# The dtypes of parameters the fused kernels take; complex tensors are updated as pairs of their real dtype.
FUSED_REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FUSED_DTYPES = (*FUSED_REAL_DTYPES, torch.complex64, torch.complex128)
# Where a fused kernel exists: the C kernel on the CPU, the Triton kernel on CUDA.
FUSED_DEVICES = ("cpu", "cuda")


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes a tensor of ``dtype`` in (complex as pairs of reals)."""
    return dtype.to_real() if dtype.is_complex else dtype


@dataclass(frozen=True, slots=True)
class Hyper:
    """Everything of one step but the tensors, built once per step by the dispatcher.

    Attributes:
        lr: learning rate, a float or a 0-dim tensor.
        beta1: momentum coefficient.
        beta2: second-moment coefficient.
        eps: floor of ``sqrt(v)`` in the normaliser.
        weight_decay: decay coefficient (0 for none).
        decoupled_weight_decay: decay the parameter (AdamW-style) instead of adding ``wd * p`` to the gradient.
        clip_exponent: the normalised gradient is clipped to ``[-t**c, t**c]``; ``None``: no clipping.
        maximize: ascend instead of descend.
        capturable: never read a tensor on the host (CUDA graphs, ``torch.compile``).
        differentiable: let autograd record the step (for-loop kernel only).
        grad_scale: AMP's scale; the gradients are divided by it (fused kernels only: the dispatcher
            unscales for the others).
        found_inf: AMP's flag; nonzero makes the whole step a no-op, step counters included (fused
            kernels only, as ``grad_scale``).
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    clip_exponent: float | None
    maximize: bool
    capturable: bool = False
    differentiable: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


class KernelPlan:
    """A slot a caller keeps between kernel calls, and its promise about them.

    Passing the same plan again promises that the parameters, the state tensors and the step counters
    are the same tensors as at the call before, with the same data, shapes, dtypes and layouts; only the
    gradients may be new tensors (which the kernel checks). A kernel keeps what it built for those
    tensors (an address table, a launch plan) in ``data`` and reuses it. A caller that cannot keep the
    promise passes a new plan, or none. :class:`adoptim.ADOPT` keeps one per param group and checks the
    promise before every step (see ``adoptim/_plan.py``).

    ``grads``, when the caller sets it, is ``(id(grads), addresses)``: the caller checked that the list
    ``grads`` of this call (found by its identity) holds plain, dense, contiguous tensors of their
    parameters' dtypes, devices and sizes, none lazily negated, at these data addresses (an ``array`` of
    int64); a kernel may then skip its own checks of them.
    """

    __slots__ = ("data", "route", "grads")

    def __init__(self) -> None:
        self.data: object = None  # the kernel's
        self.route: tuple | None = None  # the dispatcher's: the kernel choice for these tensors
        self.grads: tuple[int, Any] | None = None  # the caller's: gradients it checked (see above)


class Kernel(Protocol):
    """The one signature every kernel has (see the module docstring)."""

    def __call__(self, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], state_steps: list[Tensor], hyper: Hyper,
                 plan: KernelPlan | None = None) -> Sequence[int]: ...


def check_kernel_choice(foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """Raise ``ValueError`` for a kernel choice no kernel serves (the one place these rules live)."""
    if fused and foreach:
        raise ValueError("Invalid fused: True together with foreach=True (choose one kernel)")
    if fused and differentiable:
        raise ValueError("Invalid fused: True together with differentiable=True (needs the for-loop kernel)")
    if foreach and differentiable:
        raise ValueError("Invalid foreach: True together with differentiable=True (needs the for-loop kernel)")
