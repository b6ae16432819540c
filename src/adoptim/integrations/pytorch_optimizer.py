"""Converting a state_dict of pytorch_optimizer's ``ADOPT`` into one :class:`adoptim.ADOPT` loads.

pytorch_optimizer keeps the step counter in each param group (``group["step"]``), not per parameter, and
calls decoupled decay ``weight_decouple``. The moments (``exp_avg``, ``exp_avg_sq``) mean the same as in
adoptim, so a converted run continues with the same moments and step count; from then on it follows
adoptim's rules (clip bound ``t ** 0.25`` at update ``t``, where pytorch_optimizer used ``(t + 1) ** 0.25``).

Example::

    >>> sd = adoptim.integrations.pytorch_optimizer.convert_state_dict(old_optimizer.state_dict())
    >>> ADOPT(model.parameters()).load_state_dict(sd)
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _validate as V

__all__ = ["convert_state_dict"]

# Options of pytorch_optimizer's ADOPT that change its arithmetic in ways adoptim does not implement.
_UNSUPPORTED = {"fixed_decay": False, "cautious": False, "stable_adamw": False}


def convert_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Return an adoptim state_dict equivalent to ``state_dict`` from ``pytorch_optimizer.ADOPT``.

    Raises ``ValueError`` naming the group and option when the saved run used an option adoptim lacks,
    and when the dict does not look like pytorch_optimizer's (no group ``weight_decouple``, or state
    without a group ``step``). A dict saved before the first step converts to groups without state.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from Optimizer.state_dict())")
    groups, state = [], {}
    for gi, saved in enumerate(state_dict["param_groups"]):
        group = dict(saved)
        stepped = any(key in state_dict["state"] for key in group["params"])
        if "weight_decouple" not in group or (stepped and "step" not in group):
            raise ValueError(
                f"param group {gi} has no 'weight_decouple'{' or no step' if stepped else ''}: this is not a "
                "pytorch_optimizer ADOPT state_dict"
            )
        for key, inert in _UNSUPPORTED.items():
            if group.pop(key, inert) != inert:
                raise ValueError(f"param group {gi} was saved with {key}=True, which adoptim's ADOPT lacks")
        step = float(group.pop("step", 0))  # no step before its first call, and then no state either
        group["decoupled_weight_decay"] = bool(group.pop("weight_decouple"))
        # Its kernel choice is its own (foreach=None is another kernel here): the loading optimizer's stays.
        group.pop("foreach", None)
        groups.append(group)
        for key in group["params"]:
            if key in state_dict["state"]:
                entry = dict(state_dict["state"][key])
                entry["step"] = torch.tensor(step, dtype=V.scalar_dtype())
                state[key] = entry
    return {"state": state, "param_groups": groups}
