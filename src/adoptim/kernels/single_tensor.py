"""The for-loop kernel: one parameter at a time, the ground truth for every faster kernel.

Two forms of the same algorithm live here:

* the eager form reads each parameter's step counter on the host and branches on the first call;
* the capturable form (``capturable=True``, also chosen under ``torch.compile``) never reads a tensor on
  the host: the first call is folded into the arithmetic with ``nf = min(step, 1)`` (0 on the first call,
  1 after), so a whole step can be captured in a CUDA graph or traced without data-dependent branches.

The eager form uses the same operations in the same order as the official package and timm
(``lerp_`` into the momentum, ``add_(p, alpha=-lr*wd)`` for decoupled decay, ``addcmul_`` into the
second moment), so a run migrated from them continues bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import decay_scale
from .contract import Hyper, KernelPlan


def _scale_sub_(target: Tensor, source: Tensor, scale: float | Tensor) -> None:
    """``target -= scale * source`` for a float or a 0-dim tensor ``scale``."""
    if isinstance(scale, Tensor):
        target.sub_(source * scale)
    else:
        target.add_(source, alpha=-scale)


def single_tensor_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
) -> tuple[()]:
    """One ADOPT step, one tensor at a time (the kernel contract of :mod:`.contract`); takes every tensor
    (``plan`` is not used)."""
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise ValueError("the for-loop kernel takes no grad_scale or found_inf (the dispatcher unscales)")
    beta1, beta2, lr, eps = hyper.beta1, hyper.beta2, hyper.lr, hyper.eps
    weight_decay, decoupled_weight_decay = hyper.weight_decay, hyper.decoupled_weight_decay
    clip_exponent, maximize, capturable = hyper.clip_exponent, hyper.maximize, hyper.capturable
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            param = torch.view_as_real(param)

        # On the real view: a complex parameter is exactly a pair of reals (complex arithmetic rounds
        # weight_decay * p and the sum separately, where the real add may fuse them into one rounding).
        if weight_decay != 0 and not decoupled_weight_decay:
            grad = grad.add(param, alpha=weight_decay)

        if capturable:
            _capturable_update(
                param, grad, exp_avg, exp_avg_sq, step_t,
                beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent, eps=eps,
            )
            step_t += 1
            continue

        t = float(step_t.item())
        if t == 0:
            # v_0 = g_0^2; no parameter update on the first call.
            exp_avg_sq.addcmul_(grad, grad)
            step_t += 1
            continue

        if weight_decay != 0 and decoupled_weight_decay:
            _scale_sub_(param, param, decay_scale(lr, weight_decay, param.dtype))

        # v still holds v_{t-1}: the normaliser excludes the current gradient.
        denom = torch.clamp(exp_avg_sq.sqrt(), min=eps)
        normed = grad.div(denom)
        if clip_exponent is not None:
            bound = t**clip_exponent
            normed.clamp_(-bound, bound)
        if normed.dtype != exp_avg.dtype:  # a gradient wider than the state (grad_dtype=float32, bf16 param)
            normed = normed.to(exp_avg.dtype)
        exp_avg.lerp_(normed, 1 - beta1)
        _scale_sub_(param, exp_avg, lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_t += 1
    return ()


def _capturable_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step_t: Tensor,
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
) -> None:
    """One step with no host synchronisation: the first call (step 0) is told apart by tensor selects, not
    by a branch on the step's value.

    Later calls run the eager form's operations with the same scalars, so they give its bits. The first
    call is folded in only through selects on ``step == 0`` and, for decoupled decay, a multiplication by
    ``nf = min(step, 1)`` (exactly 0 or 1 in any dtype): a coefficient computed from the step
    (``1 - beta2 * nf``) would be rounded to the parameter's dtype, and bfloat16 rounds 0.99 to 0.988.
    """
    first = step_t == 0
    if weight_decay != 0 and decoupled_weight_decay:
        nf = torch.clamp(step_t, max=1.0).to(param.dtype)
        _scale_sub_(param, param * nf, decay_scale(lr, weight_decay, param.dtype))
    # The gradient is zeroed before the division, by a select: g / eps can overflow in float16 where v
    # is still 0 on the first call, and an inf gradient times nf = 0 would be nan, while the first call
    # leaves m and p as they are whatever the gradient (and sets v = g^2, inf included).
    normed = torch.where(first, 0.0, grad) / torch.clamp(exp_avg_sq.sqrt(), min=eps)
    if clip_exponent is not None:
        # The bound in float64, as the eager form computes it on the host, then in the parameter's dtype.
        # (normed has the state's dtype where that is wider than the parameter's: float32 state of a
        # float16 parameter, whose eager form clamps at the float32 bound.)
        bound = (step_t.double() ** clip_exponent).to(normed.dtype)
        normed = torch.minimum(torch.maximum(normed, -bound), bound)
    if normed.dtype != exp_avg.dtype:  # a gradient wider than the state, as in the eager form
        normed = normed.to(exp_avg.dtype)
    exp_avg.lerp_(normed, 1 - beta1)
    _scale_sub_(param, exp_avg, lr)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    # v = g^2 on the first call, squared in the wider of g's and v's dtypes and rounded once into v, as
    # the eager form's addcmul_ does (copy_, not where's out=, which autograd refuses when differentiable).
    g_v = grad.to(torch.promote_types(grad.dtype, exp_avg_sq.dtype))
    exp_avg_sq.copy_(torch.where(first, g_v * g_v, exp_avg_sq))
