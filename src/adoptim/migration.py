"""Reading optimizer state: adoptim's own (older versions included) and other ADOPT ports'.

Everything :meth:`adoptim.ADOPT.load_state_dict` and ``__setstate__`` do to a saved state lives here:
renaming other ports' group keys (:func:`translate_group`), checking the state against the parameters
before anything changes (:func:`check_state_matches`), casting complex moments
(:func:`cast_complex_state`), and filling flags and tensor steps an older state lacks
(:func:`upgrade_state`).

The per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``) has the same names and meaning in the
official ``torch-adopt`` package, timm's ``Adopt`` and adoptim: ``step`` counts every call including the
first, so the clip bound at the next update is ``step ** clip_exponent`` in all three. Only the names of
the group flags differ:

=====================  ======================  ===========================================
adoptim                torch-adopt             timm ``Adopt``
=====================  ======================  ===========================================
decoupled_weight_decay decouple                decoupled
clip_exponent          (not saved: a lambda)   clip_exp (default 0.333)
=====================  ======================  ===========================================

torch-adopt keeps its clip rule in a lambda outside the state_dict; a group from it keeps the clip
exponent of the optimizer it is loaded into (0.25 by default, the same as torch-adopt's default).

The kernel choice of another port's group (``foreach``, ``fused``, ``capturable``, ``differentiable``)
is that port's, not the run's: ``foreach=None`` means its for-loop kernel on the CPU there and the fused
kernel here. Those keys are dropped, so the loading optimizer's own choice stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import _validate as V
from .kernels.common import dtensor_type

_RENAMED = {"decouple": "decoupled_weight_decay", "decoupled": "decoupled_weight_decay", "clip_exp": "clip_exponent"}
# Flags of other ports that change nothing when they hold these values; any other value changes the
# arithmetic in a way adoptim does not implement, so loading is refused rather than silently different.
_INERT = {"caution": (False,), "corrected_weight_decay": (False,), "max_lr_snapshot": None}
_KERNEL_CHOICE = ("foreach", "fused", "capturable", "differentiable")


def translate_group(group: dict[str, Any], index: int) -> dict[str, Any]:
    """Return a copy of a saved param group with other ports' keys renamed to adoptim's."""
    if "amsgrad" in group:
        raise ValueError(
            f"param group {index} was saved by torch.optim's Adam or AdamW (it has 'amsgrad'): their exp_avg "
            "is a momentum of raw gradients, ADOPT's of normalised ones, so the state cannot continue as ADOPT"
        )
    out = dict(group)
    if any(old in out for old in _RENAMED):  # another port's group
        for key in _KERNEL_CHOICE:
            out.pop(key, None)
    for old, new in _RENAMED.items():
        if old in out:
            value = out.pop(old)
            if new not in out:
                out[new] = value
    for key, allowed in _INERT.items():
        if key not in out:
            continue
        value = out.pop(key)
        if allowed is not None and value not in allowed:
            raise ValueError(
                f"param group {index} was saved with {key}={value!r}, which adoptim's ADOPT does not "
                "implement; loading it would silently change the algorithm"
            )
    return out


def check_state_matches(saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]],
                        param_groups: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless a saved state fits the optimizer's parameters (before anything changes)."""
    dtensor = dtensor_type()
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups but the optimizer has {len(param_groups)}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi} of the state_dict has {len(saved['params'])} parameters but the "
                f"optimizer's has {len(group['params'])}"
            )
        for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            st = saved_state.get(key)
            if st is None or (isinstance(st, dict) and not st):
                continue
            if not isinstance(st, dict):
                raise ValueError(
                    f"state of param group {gi} parameter {pi} is a {type(st).__name__}, not a dict of "
                    "'step', 'exp_avg' and 'exp_avg_sq'"
                )
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
            if missing:
                hint = ""
                if missing == ["step"] and "step" in saved:
                    # pytorch_optimizer's ADOPT counts steps per param group, not per parameter.
                    hint = (" (its param group holds the step count, as pytorch_optimizer's ADOPT saves it: "
                            "convert it with adoptim.integrations.pytorch_optimizer.convert_state_dict)")
                raise ValueError(f"state of param group {gi} parameter {pi} lacks {missing}{hint}")
            for name in ("exp_avg", "exp_avg_sq"):
                t = st[name]
                if not torch.is_tensor(t) or t.shape != p.shape:
                    shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                    raise ValueError(
                        f"state_dict does not match the parameters: param group {gi} parameter {pi} has "
                        f"shape {tuple(p.shape)} but its {name} has shape {shape}"
                    )
                if dtensor is not None and isinstance(p, dtensor) != isinstance(t, dtensor):
                    raise ValueError(
                        f"state_dict does not match the parameters: param group {gi} parameter {pi} is a "
                        f"{type(p).__name__} but its {name} is a {type(t).__name__}. A sharded (FSDP2, "
                        "DTensor) optimizer loads a full or sharded state dict through torch.distributed."
                        "checkpoint.state_dict.set_optimizer_state_dict, which lays the state out as the "
                        "parameters are"
                    )
            step = st["step"]
            if torch.is_tensor(step):
                if step.numel() != 1 or step.dtype == torch.bool or step.is_complex():
                    raise ValueError(
                        f"state of param group {gi} parameter {pi} has a step of {step.numel()} elements "
                        f"of {step.dtype} (must be one real number)"
                    )
            elif not V.is_real(step):
                raise ValueError(
                    f"state of param group {gi} parameter {pi} has step {step!r} (must be a number or a "
                    "one-element tensor)"
                )


def cast_complex_state(saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]],
                       param_groups: list[dict[str, Any]]) -> dict[Any, Any]:
    """The saved state with the moments of complex parameters in their parameter's dtype.

    torch.optim casts loaded state to its parameter's dtype for floating-point parameters only; a
    complex parameter cast after some steps (complex64 to complex128) would otherwise keep state its
    step refuses, with no way to reload it.
    """
    out = dict(saved_state)
    for saved, group in zip(saved_groups, param_groups, strict=True):
        for key, p in zip(saved["params"], group["params"], strict=True):
            st = out.get(key)
            if st and p.is_complex():
                out[key] = {k: v.to(p.dtype) if k != "step" and torch.is_tensor(v) and v.is_complex() else v
                            for k, v in st.items()}
    return out


def upgrade_state(param_groups: Iterable[dict[str, Any]], state: dict[Any, Any], defaults: dict[str, Any]) -> None:
    """Fill, in place, what a state from an older version or another port lacks: newer group flags (from
    ``defaults``) and tensor steps (a number becomes a tensor, on the parameter's device where the kernel
    keeps it there)."""
    for group in param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)
        for p in group["params"]:
            p_state = state.get(p, {})
            if p_state and not torch.is_tensor(p_state.get("step")):
                device = p.device if group["capturable"] or group["fused"] else "cpu"
                p_state["step"] = torch.tensor(float(p_state["step"]), dtype=V.scalar_dtype(), device=device)
