"""Argument checks shared by the optimizer classes: each names the argument and the value."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .kernels.contract import FUSED_DEVICES, FUSED_DTYPES, check_kernel_choice


def is_real(x: Any) -> bool:
    """A real number that is not a bool (True is an int to Python, not a step count or a rate)."""
    return isinstance(x, Real) and not isinstance(x, bool)


def check_lr(lr: Any) -> float | Tensor:
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Invalid lr: a tensor lr must be a one-element floating tensor, got {lr!r}")
        value = float(lr.detach().reshape(()).item()) if lr.device.type == "cpu" else 0.0
        if lr.device.type == "cpu" and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid lr: {value} (must be a finite number >= 0)")
        return lr.reshape(()) if lr.dim() else lr
    if not is_real(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0)")
    return float(lr)


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    values = []
    for i, b in enumerate(betas):
        if torch.is_tensor(b):
            # torch.optim takes one-element tensor betas too; ADOPT's kernels take numbers: read it once.
            if b.numel() != 1 or b.dtype == torch.bool or b.is_complex() or not b.dtype.is_floating_point:
                raise ValueError(
                    f"Invalid beta parameter at index {i}: a tensor of {b.numel()} elements of {b.dtype} "
                    "(must be a number in [0, 1), or a one-element floating-point tensor)"
                )
            b = b.item()
        if not is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
        values.append(float(b))
    return values[0], values[1]


def check_eps(eps: Any) -> float:
    if not is_real(eps) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"Invalid eps: {eps!r} (must be a finite number > 0: the first update divides by it)")
    return float(eps)


def check_weight_decay(weight_decay: Any) -> float:
    if not is_real(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be a finite number >= 0)")
    return float(weight_decay)


def check_clip_exponent(clip_exponent: Any) -> float | None:
    if clip_exponent is None:
        return None
    if not is_real(clip_exponent) or not math.isfinite(clip_exponent) or clip_exponent < 0:
        raise ValueError(f"Invalid clip_exponent: {clip_exponent!r} (must be None or a finite number >= 0)")
    return float(clip_exponent)


def check_flag(name: str, value: Any, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False{' or None' if allow_none else ''})")
    return value


# The values of the ``state_precision`` option (adoptim.low_precision).
STATE_PRECISIONS = ("full", "bfloat16", "8bit")


def check_group(group: dict[str, Any]) -> None:
    """Validate the hyper-parameters of one param group in place (used for add_param_group too)."""
    group["lr"] = check_lr(group["lr"])
    group["betas"] = check_betas(group["betas"])
    group["eps"] = check_eps(group["eps"])
    group["weight_decay"] = check_weight_decay(group["weight_decay"])
    group["clip_exponent"] = check_clip_exponent(group["clip_exponent"])
    for name in ("decoupled_weight_decay", "maximize", "capturable", "differentiable"):
        check_flag(name, group[name])
    check_flag("foreach", group["foreach"], allow_none=True)
    check_flag("fused", group["fused"], allow_none=True)
    check_kernel_choice(group["foreach"], group["fused"], group["differentiable"])
    check_flag("flat", group.get("flat", False))
    if group.get("flat") and group["differentiable"]:
        raise ValueError("Invalid flat: True together with differentiable=True (the flat buffers are updated in place)")
    check_state_precision(group)
    check_param_rounding(group)


# The values of the ``param_rounding`` option: how a bfloat16 parameter takes its float32 update.
PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")


def check_param_rounding(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a ``param_rounding`` no kernel serves (a group's, at construction)."""
    mode = group.get("param_rounding", "nearest")
    if mode not in PARAM_ROUNDINGS:
        choices = ", ".join(map(repr, PARAM_ROUNDINGS))
        raise ValueError(f"Invalid param_rounding: {mode!r} (must be one of {choices})")
    if mode == "nearest":
        return
    for flag in ("fused", "foreach", "capturable", "differentiable", "flat"):
        if group.get(flag):
            raise ValueError(
                f"Invalid param_rounding: {mode!r} together with {flag}=True (bfloat16 parameters are then "
                "stepped by the torch for-loop path, which does not take that option)"
            )


def check_state_precision(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a state-precision option no kernel serves (a group's, at construction)."""
    precision = group.get("state_precision", "full")
    if precision not in STATE_PRECISIONS:
        choices = ", ".join(map(repr, STATE_PRECISIONS))
        raise ValueError(f"Invalid state_precision: {precision!r} (must be one of {choices})")
    block = group.get("state_block_size", 256)
    if not is_real(block) or int(block) != block or block < 1 or int(block) & (int(block) - 1):
        raise ValueError(f"Invalid state_block_size: {block!r} (must be a power of two)")
    size = group.get("state_min_size", 4096)
    if not is_real(size) or int(size) != size or size < 0:
        raise ValueError(f"Invalid state_min_size: {size!r} (must be an integer >= 0)")
    if precision == "full":
        return
    for flag in ("fused", "foreach", "capturable", "differentiable", "flat"):
        if group.get(flag):
            raise ValueError(
                f"Invalid state_precision: {precision!r} together with {flag}=True (low-precision state picks "
                "its own kernels, which do not take that option)"
            )


def check_fused_params(params: Any) -> None:
    """With ``fused=True``: raise unless every parameter is of a dtype on a device a fused kernel takes."""
    params = [params] if isinstance(params, Tensor) else params
    for i, p in enumerate(params):
        p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # named parameters
        if not isinstance(p, Tensor):
            continue
        if p.dtype not in FUSED_DTYPES or p.device.type not in FUSED_DEVICES:
            raise ValueError(
                f"Invalid fused: True for parameter {i} of dtype {p.dtype} on {p.device.type}: the fused "
                f"kernels take {', '.join(str(d).removeprefix('torch.') for d in FUSED_DTYPES)} parameters "
                f"on {' or '.join(FUSED_DEVICES)}"
            )


def scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
