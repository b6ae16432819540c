"""``adopt(...)``: the functional form of ADOPT, which picks a kernel and runs it.

Every kernel takes the same keyword set, so a caller (the :class:`~adoptim.ADOPT` class, a training
loop that keeps its own state, a compiled step) can switch kernels with one flag.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels.foreach import foreach_adopt
from .kernels.single_tensor import single_tensor_adopt

__all__ = ["adopt", "default_foreach"]

_FOREACH_DEVICES = ("cuda", "xpu", "mps")


def default_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """The kernel chosen when the user sets none: foreach on accelerators, the for-loop elsewhere.

    Like torch.optim, the multi-tensor kernel is the default only where a kernel launch is expensive
    (all parameters on CUDA-like devices) and never with ``differentiable=True``.
    """
    if differentiable or not params:
        return False
    return all(type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params) and all(
        p.device.type in _FOREACH_DEVICES for p in params
    )


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
    maximize: bool,
) -> None:
    r"""Run one ADOPT step in place on ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps``.

    ``state_steps`` are float tensors counting the calls made so far for each parameter (0 before the
    first). See :mod:`adoptim.reference` for the exact arithmetic.

    Example::

        >>> p, g = torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])
        >>> m, v, s = torch.zeros(3), torch.zeros(3), torch.tensor(0.0)
        >>> for _ in range(2):
        ...     adopt([p], [g], [m], [v], [s], beta1=0.9, beta2=0.9999, lr=0.1, weight_decay=0.0,
        ...           decoupled_weight_decay=False, clip_exponent=0.25, eps=1e-6, maximize=False)
        >>> p  # the first call only set v = g*g; the second moved p by -lr*(1-beta1)*sign(g)
        tensor([-0.0100,  0.0100, -0.0100])
    """
    lists = (grads, exp_avgs, exp_avg_sqs, state_steps)
    if any(len(x) != len(params) for x in lists):
        raise ValueError(
            "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got "
            f"{[len(params)] + [len(x) for x in lists]}"
        )
    if not all(isinstance(t, Tensor) for t in state_steps):
        raise TypeError("state_steps must be a list of tensors")
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    if _is_compiling():
        # A traced step must not branch on a tensor's value: use the arithmetic first-step form.
        capturable = True
    kernel = foreach_adopt if foreach else single_tensor_adopt
    kernel(
        params, grads, exp_avgs, exp_avg_sqs, state_steps,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent, eps=eps,
        maximize=maximize, capturable=capturable, differentiable=differentiable,
    )
