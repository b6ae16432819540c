"""The capability record that drives the generic optimizer tests (in the spirit of torch's OptimizerInfo).

Each entry is a set of constructor flags selecting one kernel of ``ADOPT``; every generic test runs over
all of them. A kernel that exists only in some builds adds itself here behind an availability check.
"""

from __future__ import annotations

import torch

import adoptim

KERNELS: dict[str, dict[str, bool]] = {
    "forloop": {"foreach": False},
    "foreach": {"foreach": True},
    "forloop-capturable": {"foreach": False, "capturable": True},
    "foreach-capturable": {"foreach": True, "capturable": True},
}


def _accepts(flags: dict[str, bool]) -> bool:
    try:
        adoptim.ADOPT([torch.zeros(1, requires_grad=True)], **flags)
    except (TypeError, ValueError):
        return False
    return True


if _accepts({"fused": True}):
    KERNELS["fused"] = {"fused": True}

# Every combination of the algorithm's flags (each independently on and off).
FLAG_COMBOS = [
    dict(weight_decay=wd, decoupled_weight_decay=dec, clip_exponent=clip, maximize=mx)
    for wd in (0.0, 0.1)
    for dec in ((False, True) if wd else (False,))
    for clip in (0.25, None)
    for mx in (False, True)
]
