"""The multi-tensor kernel: the for-loop algorithm on lists, with ``torch._foreach_*`` operations.

Tensors are grouped by (device, dtype) so each foreach call can take its fast path. Per-parameter step
counters stay per parameter: in the eager form, the parameters on their first call are split from the
rest (a parameter whose gradient appears late starts then), and the clip bound is a list with one value
per parameter. The capturable form folds the first call into the arithmetic, as the for-loop kernel does.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .common import decay_scale
from .contract import Hyper, KernelPlan
from .single_tensor import single_tensor_adopt


def _group_by_device_and_dtype(params: list[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    return groups


def _real(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def _in_dtypes_of(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """``tensors`` cast to the dtypes of ``like`` where they differ: the normalised gradient of a gradient
    wider than the state (``grad_dtype=float32`` on a bfloat16 parameter) goes into the state's dtype."""
    if all(t.dtype is x.dtype for t, x in zip(tensors, like)):
        return tensors
    return [t.to(x.dtype) for t, x in zip(tensors, like)]


def _scale_sub_(targets: list[Tensor], sources: list[Tensor], scale: float | Tensor) -> None:
    """``targets -= scale * sources``, elementwise over the lists."""
    if isinstance(scale, Tensor):
        torch._foreach_sub_(targets, torch._foreach_mul(sources, scale))
    else:
        torch._foreach_add_(targets, sources, alpha=-scale)


def foreach_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
) -> tuple[()]:
    """One ADOPT step on lists (the kernel contract of :mod:`.contract`); takes every tensor
    (``plan`` is not used)."""
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise ValueError("the foreach kernel takes no grad_scale or found_inf (the dispatcher unscales)")
    if not params:
        return ()
    if len(set(map(id, params))) < len(params):
        # A parameter listed twice (torch.optim only warns): each foreach operation would see both
        # entries before the step counter moves, so the for-loop kernel updates them one after the other.
        return single_tensor_adopt(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper)
    beta1, beta2, lr, eps = hyper.beta1, hyper.beta2, hyper.lr, hyper.eps
    weight_decay, decoupled_weight_decay = hyper.weight_decay, hyper.decoupled_weight_decay
    clip_exponent, maximize, capturable = hyper.clip_exponent, hyper.maximize, hyper.capturable
    for idx in _group_by_device_and_dtype(params).values():
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        m = [exp_avgs[i] for i in idx]
        v = [exp_avg_sqs[i] for i in idx]
        s = [state_steps[i] for i in idx]

        if maximize:
            g = torch._foreach_neg(g)
        # Complex tensors as pairs of reals before the coupled decay, as in the for-loop kernel.
        p, g, m, v = _real(p), _real(g), _real(m), _real(v)
        if weight_decay != 0 and not decoupled_weight_decay:
            if maximize:  # g is already a fresh list (of views of fresh tensors)
                torch._foreach_add_(g, p, alpha=weight_decay)
            else:
                g = torch._foreach_add(g, p, alpha=weight_decay)

        kwargs = dict(
            beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent, eps=eps,
        )
        if capturable:
            _capturable_update(p, g, m, v, s, **kwargs)
        else:
            steps = [float(t.item()) for t in s]
            first = [j for j, t in enumerate(steps) if t == 0]
            later = [j for j, t in enumerate(steps) if t != 0]
            if first:
                vf, gf = [v[j] for j in first], [g[j] for j in first]
                torch._foreach_addcmul_(vf, gf, gf)
            if later:
                _eager_update(
                    [p[j] for j in later], [g[j] for j in later], [m[j] for j in later],
                    [v[j] for j in later], [steps[j] for j in later], **kwargs,
                )
        torch._foreach_add_(s, 1)
    return ()


def _eager_update(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    steps: list[float],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
) -> None:
    if weight_decay != 0 and decoupled_weight_decay:
        _scale_sub_(p, p, decay_scale(lr, weight_decay, p[0].dtype))
    denom = torch._foreach_sqrt(v)
    torch._foreach_clamp_min_(denom, eps)
    normed = torch._foreach_div(g, denom)
    del denom
    if clip_exponent is not None:
        bounds = [t**clip_exponent for t in steps]
        torch._foreach_clamp_min_(normed, [-b for b in bounds])
        torch._foreach_clamp_max_(normed, bounds)
    normed = _in_dtypes_of(normed, m)
    torch._foreach_lerp_(m, normed, 1 - beta1)
    del normed
    _scale_sub_(p, m, lr)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)


def _capturable_update(
    p: list[Tensor],
    g: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    s: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
) -> None:
    """The same arithmetic as the for-loop kernel's capturable form, on lists (see there why only selects
    on ``step == 0`` and a multiplication by ``nf``, exactly 0 or 1, fold the first call in)."""
    first = [t == 0 for t in s]
    if weight_decay != 0 and decoupled_weight_decay:
        nf = [torch.clamp(t, max=1.0).to(x.dtype) for t, x in zip(s, p)]
        _scale_sub_(p, torch._foreach_mul(p, nf), decay_scale(lr, weight_decay, p[0].dtype))
    denom = torch._foreach_sqrt(v)
    torch._foreach_clamp_min_(denom, eps)
    # Zeroed before the division by a select (g / eps can overflow in float16, and inf * 0 is nan); the
    # division promotes to v's dtype as the eager form's does where the state is wider than the parameter.
    normed = torch._foreach_div([torch.where(f, 0.0, x) for f, x in zip(first, g)], denom)
    del denom
    if clip_exponent is not None:
        bounds = [(t.double() ** clip_exponent).to(x.dtype) for t, x in zip(s, normed)]
        torch._foreach_maximum_(normed, torch._foreach_neg(bounds))
        torch._foreach_minimum_(normed, bounds)
    normed = _in_dtypes_of(normed, m)
    torch._foreach_lerp_(m, normed, 1 - beta1)
    del normed
    _scale_sub_(p, m, lr)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    for vi, gi, f in zip(v, g, first):
        gi = gi.to(torch.promote_types(gi.dtype, vi.dtype))  # squared as the eager form's addcmul_ does
        vi.copy_(torch.where(f, gi * gi, vi))  # v = g^2 on the first call, rounded once into v
