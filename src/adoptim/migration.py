"""Reading optimizer state written by other ADOPT ports.

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

from typing import Any

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
