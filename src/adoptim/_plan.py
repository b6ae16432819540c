"""What one step keeps for the next: each param group's collection, and a cheap check that it still holds.

A training loop steps the same parameters with the same state at every step; only the gradients are new
(``zero_grad(set_to_none=True)`` frees them). :meth:`adoptim.ADOPT.step` keeps, per param group, the lists
its collection pass (``ADOPT._init_group``) made and the facts those lists rest on, and reuses them while
a check of the facts passes; the kernels keep their address tables in the same record
(:class:`~adoptim.kernels.contract.KernelPlan`). The check notices every way the lists can go stale:

* a param group added or removed, its ``params`` list replaced or changed (compared element by element);
* a parameter that gained or lost its gradient, or a sparse gradient (the collection pass refuses it);
* a parameter's ``.data`` replaced: its data pointer, strides or size differ (a dtype or device change
  moves the data, so it is among these);
* ``opt.state`` replaced, or written at either level: a parameter's entry set, deleted or replaced, or a
  key of an entry set (``load_state_dict`` replaces the whole state). Entries are :class:`ParamState`
  dicts that count their writes; an entry someone set to a plain dict is compared key by key instead;
* a state tensor's ``.data`` replaced (the data pointers of ``exp_avg``, ``exp_avg_sq`` and ``step``).

The facts of the tensors (address, size, dtype, device, layout, sizes and strides) are read in one C call
per group and step where the compiled library is installed (:mod:`adoptim.kernels.facts`), which also
checks that the new gradients are plain contiguous tensors of their parameters' dtypes, devices and sizes;
the kernels then skip their own checks (:attr:`~adoptim.kernels.contract.KernelPlan.grads`). Otherwise the
same facts are read in Python, and gradients of another dtype, layout or kind are the kernels' business:
they check them at every call.
Groups that are differentiable or hold tensor subclasses (DTensor) are collected afresh at every step.

A low-precision group (``state_precision`` ``"8bit"`` or ``"bfloat16"``) steps as two entries, its small
parameters with full state and the others with :class:`~adoptim.kernels.lowbit.Stored` moments
(``adoptim/low_precision.py``); :class:`SplitPlan` keeps both behind the same check, over the tensors the
records hold (codes, scales, the rounding seed), and also notices a change of the group's storage options
(which decide the split) and a seed written in place (its version counter: the records hold its value).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain, repeat
from operator import attrgetter, is_, is_not
from typing import Any

from torch import Tensor

from .kernels.common import PLAIN_TENSOR_TYPES
from .kernels.contract import KernelPlan
from .kernels.facts import kept_facts

_grad = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_ptr = Tensor.data_ptr
_stride = Tensor.stride
_numel = Tensor.numel
_version = attrgetter("_version")


class _CountsWrites:
    """Dict methods that write, each counting the write (``_wrote``) before it is made."""

    __slots__ = ()

    def _wrote(self) -> None:
        raise NotImplementedError

    def __setitem__(self, key: Any, value: Any) -> None:
        self._wrote()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._wrote()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._wrote()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._wrote()
        return super().popitem()

    def clear(self) -> None:
        self._wrote()
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._wrote()
        super().update(*args, **kwargs)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._wrote()
        return super().setdefault(key, default)

    def __ior__(self, other: Any) -> Any:
        self._wrote()
        return super().__ior__(other)


class ParamState(_CountsWrites, dict):
    """One parameter's state entry (a dict), counting its writes on the optimizer's :class:`StateDict`.

    Pickles, and appears in ``state_dict()``, as a plain dict.
    """

    __slots__ = ("_owner",)

    def __init__(self, owner: StateDict, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self, *args, **kwargs)
        self._owner = owner

    def _wrote(self) -> None:
        self._owner.writes += 1

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)

    def __copy__(self) -> dict:
        return dict(self)

    def __deepcopy__(self, memo: dict) -> dict:
        import copy

        return copy.deepcopy(dict(self), memo)


class StateDict(_CountsWrites, defaultdict):
    """``opt.state``: torch.optim's ``defaultdict(dict)``, counting writes to itself and its entries.

    Pickles as a plain ``defaultdict(dict)`` of plain dicts (the optimizer wraps it again on load).
    """

    def __init__(self, items: Any = ()) -> None:
        defaultdict.__init__(self, None)
        self.writes = 0
        for key, value in dict(items).items():
            defaultdict.__setitem__(self, key, self.wrap(value))

    def _wrote(self) -> None:
        self.writes += 1

    def wrap(self, value: Any) -> Any:
        """``value`` as a :class:`ParamState` of this dict when it is a plain dict (else as it is)."""
        return ParamState(self, value) if type(value) is dict else value

    def __missing__(self, key: Any) -> ParamState:
        value = ParamState(self)
        self[key] = value
        return value

    def __reduce__(self) -> tuple:
        return _plain_state, (dict(self),)

    def __copy__(self) -> defaultdict:
        return _plain_state(dict(self))

    def __deepcopy__(self, memo: dict) -> defaultdict:
        import copy

        return copy.deepcopy(_plain_state(dict(self)), memo)


def _plain_state(items: dict) -> defaultdict:
    """A plain ``defaultdict(dict)`` of plain dicts: what ``opt.state`` pickles as."""
    out: defaultdict = defaultdict(dict)
    for key, value in items.items():
        out[key] = dict(value) if isinstance(value, dict) else value
    return out


class GroupPlan:
    """One param group's collection (the five lists) and the facts it rests on."""

    __slots__ = ("group", "params_list", "all_params", "mask", "part", "kernel")

    def __init__(self, group: dict[str, Any], lists: list[list[Tensor]], state: StateDict) -> None:
        self.group = group
        self.params_list, self.all_params, self.mask = _params_and_mask(group)
        # The collection holds the parameters with gradients, in the group's order.
        positions = None if self.mask is None else [i for i, has in enumerate(self.mask) if has]
        self.part = _Part(lists, positions, state, full=True)
        self.kernel = self.part.kernel

    def current(self) -> list[list[Tensor]] | None:
        """The five lists with this step's gradients, or ``None`` when any fact they rest on changed."""
        grads = _same_params_grads(self.group, self.params_list, self.all_params, self.mask)
        return None if grads is None else self.part.current(grads)

    def step_entries(self) -> list[tuple[dict[str, Any], list[list[Tensor]], KernelPlan]] | None:
        """The group's step entry (group, lists, kernel plan) as a list of one, or ``None`` (see :meth:`current`)."""
        lists = self.current()
        return None if lists is None else [(self.group, lists, self.kernel)]


def _params_and_mask(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[bool] | None]:
    """A group's ``params`` list (the object), a copy of it, and which parameters have gradients (``None``: all)."""
    params_list = group["params"]
    all_params = list(params_list)
    grads = list(map(_grad, all_params))
    mask = None if not any(map(is_, grads, repeat(None))) else list(map(is_not, grads, repeat(None)))
    return params_list, all_params, mask


def _same_params_grads(group: dict[str, Any], params_list: list[Tensor], all_params: list[Tensor],
                       mask: list[bool] | None) -> list[Tensor | None] | None:
    """Every parameter's gradient (``None`` where it has none) when the group holds the same parameters, with
    gradients where they had them (``mask``), else ``None``."""
    if group["params"] is not params_list or len(params_list) != len(all_params):
        return None
    if not all(map(is_, params_list, all_params)):
        return None
    grads = list(map(_grad, all_params))
    if mask is None:
        if any(map(is_, grads, repeat(None))):
            return None
    elif list(map(is_not, grads, repeat(None))) != mask:
        return None
    return grads


class _Facts:
    """The facts of parameters and the tensors a collection keeps beside them, recorded once, and the check
    of one step: in one C call where the library allows (kernels/facts.py); else in Python, the data
    pointers of all (one map and one comparison) and the parameters' strides and sizes."""

    __slots__ = ("params", "facts", "ptrs", "p_strides", "p_numels", "tensors")

    def __init__(self, params: list[Tensor], *state: list[Tensor]) -> None:
        self.params = params
        self.facts = kept_facts(params, *state)
        if self.facts is None:
            self.tensors = state
            self.ptrs = list(map(_ptr, chain(params, *state)))
            self.p_strides = list(map(_stride, params))
            self.p_numels = list(map(_numel, params))

    def check(self, grads: list[Tensor]) -> bool | None:
        """``None`` when a fact changed or a gradient is sparse; ``True`` when the C check also found the
        gradients plain, dense, contiguous tensors of their parameters' dtypes, devices and sizes (their
        addresses in ``facts.grad_ptrs``); ``False`` when the facts hold and the gradients are unverified."""
        facts = self.facts
        if facts is not None:
            verified = facts.check(grads)
            if verified is None or (not verified and any(map(_is_sparse, grads))):
                return None
            return verified
        if any(map(_is_sparse, grads)):
            return None
        params = self.params
        # Strides and sizes: a view of the same data (same address) with another layout or fewer elements.
        if list(map(_stride, params)) != self.p_strides or list(map(_numel, params)) != self.p_numels:
            return None
        if list(map(_ptr, chain(params, *self.tensors))) != self.ptrs:
            return None
        return False


class SplitPlan:
    """A low-precision group's step entries, kept: ``adoptim/low_precision.py``'s ``build`` makes one for its
    parameters with full state (its small ones) and one for those with :class:`~adoptim.kernels.lowbit.Stored`
    moments; each is checked as :class:`GroupPlan` checks a group, over the tensors the records hold. The
    split itself rests on the group's storage options (``option_keys``), compared at every step."""

    __slots__ = ("group", "option_keys", "options", "params_list", "all_params", "mask", "parts")

    def __init__(self, group: dict[str, Any], entries: list[tuple[dict[str, Any], list[list[Any]]]],
                 state: StateDict, option_keys: tuple[str, ...]) -> None:
        self.group, self.option_keys = group, option_keys
        self.options = tuple(map(group.get, option_keys))
        self.params_list, self.all_params, self.mask = _params_and_mask(group)
        where = {id(p): i for i, p in enumerate(self.all_params)}
        self.parts = [_Part(lists, [where[id(p)] for p in lists[0]], state, entry["state_precision"] == "full")
                      for entry, lists in entries]

    def step_entries(self) -> list[tuple[dict[str, Any], list[list[Any]], KernelPlan | None]] | None:
        """The entries, as ``build`` makes them, with this step's gradients; ``None`` when anything changed."""
        group = self.group
        if tuple(map(group.get, self.option_keys)) != self.options:
            return None
        grads = _same_params_grads(group, self.params_list, self.all_params, self.mask)
        if grads is None:
            return None
        out = []
        for part in self.parts:
            lists = part.current(grads)
            if lists is None:
                return None
            # A copy of the group for the full-state part, made now: it carries the group's lr of this step.
            out.append(({**group, "state_precision": "full"} if part.full else group, lists, part.kernel))
        return out


# What a state entry's lists rest on: full state, and low-precision records (adoptim/low_precision.py).
_FULL_KEYS = ("exp_avg", "exp_avg_sq", "step")
_LOW_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "rounding_seed", "step")


class _Part:
    """One step entry's lists (the gradients left out), where its parameters are in the group (``positions``;
    ``None``: all of them, in order), and the facts of what it holds: full state tensors (``full``), or the
    records' tensors and the rounding seeds, whose values the records hold (checked by version counter)."""

    __slots__ = ("full", "lists", "positions", "entries", "keys", "held", "untracked", "facts", "seeds",
                 "seed_versions", "kernel")

    def __init__(self, lists: list[list[Any]], positions: list[int] | None, state: StateDict, full: bool) -> None:
        params, _, exp_avgs, exp_avg_sqs, state_steps = lists
        self.full, self.lists, self.positions = full, [params, None, exp_avgs, exp_avg_sqs, state_steps], positions
        # The gradients are not kept: each step brings its own (keeping them would hold a step's worth of memory).
        self.entries = [state[p] for p in params]
        # Entries someone set to a plain dict do not count their writes: those are compared at every step.
        self.untracked = any(type(e) is not ParamState or e._owner is not state for e in self.entries)
        self.keys = _FULL_KEYS if full else _LOW_KEYS
        self.held = [tuple(map(e.get, self.keys)) for e in self.entries] if self.untracked else None
        if full:
            self.seeds = self.seed_versions = None
            self.facts = _Facts(params, exp_avgs, exp_avg_sqs, state_steps)
            self.kernel: KernelPlan | None = KernelPlan()
            return
        self.seeds = [e["rounding_seed"] for e in self.entries]
        self.seed_versions = list(map(_version, self.seeds))
        scales = [x.absmax for x in chain(exp_avgs, exp_avg_sqs) if x.absmax is not None]
        self.facts = _Facts(params, [m.data for m in exp_avgs], [v.data for v in exp_avg_sqs], scales,
                            state_steps, self.seeds)
        self.kernel = None

    def current(self, grads: list[Tensor | None]) -> list[list[Any]] | None:
        """The five lists with this step's gradients (of the whole group, ``None`` where a parameter has
        none), or ``None`` when any fact they rest on changed."""
        if self.positions is not None:
            grads = [grads[i] for i in self.positions]
        verified = self.facts.check(grads)
        if verified is None:
            return None
        if self.full:
            # The kernels skip their own checks of these gradients (found by the list's identity).
            self.kernel.grads = (id(grads), self.facts.facts.grad_ptrs) if verified else None
        else:
            # The low-precision collection refuses a gradient of another kind than its parameter (DTensor):
            # only plain ones step from kept lists; and the records hold each seed's value.
            if not verified and not set(map(type, grads)) <= PLAIN_TENSOR_TYPES:
                return None
            if list(map(_version, self.seeds)) != self.seed_versions:
                return None
        if self.untracked and any(not all(map(is_, map(e.get, self.keys), held))
                                  for e, held in zip(self.entries, self.held)):
            return None
        params, _, exp_avgs, exp_avg_sqs, state_steps = self.lists
        return [params, grads, exp_avgs, exp_avg_sqs, state_steps]


def plannable(group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether a group's collection may be kept between steps (see the module docstring)."""
    return not group["differentiable"] and set(map(type, params)) <= PLAIN_TENSOR_TYPES


class KeptPlans:
    """The collection of an optimizer's groups in the default layout, kept from one step to the next."""

    def __init__(self) -> None:
        self.kept: tuple | None = None  # (state, groups, state's write count, plans)

    def clear(self) -> None:
        self.kept = None

    def _plans(self, groups: list[dict[str, Any]], state: Any) -> list | None:
        """The kept plans when the state and the groups are the ones they were made for."""
        if self.kept is None:
            return None
        kept_state, kept_groups, writes, plans = self.kept
        if not (state is kept_state and state.writes == writes and len(groups) == len(kept_groups)
                and all(map(is_, groups, kept_groups))):
            return None
        return plans

    def lists(self, groups: list[dict[str, Any]], state: Any) -> list[tuple] | None:
        """(group, lists, kernel plan) per step entry from the kept plans (one per group, two per
        low-precision group), or ``None`` when anything changed."""
        plans = self._plans(groups, state)
        if plans is None:
            return None
        out = []
        for plan in plans:
            entries = plan.step_entries()
            if entries is None:
                return None
            out.extend(entries)
        return out

    def keep(self, collected: list[tuple[dict[str, Any], list[list[Tensor]]]], state: Any) -> list[tuple]:
        """Keep freshly collected lists where every group allows it; (group, lists, kernel plan) per group."""
        if not (isinstance(state, StateDict) and all(plannable(group, lists[0]) for group, lists in collected)):
            self.kept = None
            return [(group, lists, None) for group, lists in collected]
        plans = [GroupPlan(group, lists, state) for group, lists in collected]
        self.kept = (state, tuple(group for group, _ in collected), state.writes, plans)
        return [(group, lists, plan.kernel) for (group, lists), plan in zip(collected, plans, strict=True)]

    def keep_split(self, built: list[tuple[dict[str, Any], list[tuple[dict[str, Any], list[list[Any]]]]]],
                   state: Any, option_keys: tuple[str, ...]) -> list[tuple]:
        """Keep the entries ``build`` made, per low-precision group (group, [(entry group, lists)]), where every
        group allows it; the entries as (entry group, lists, kernel plan)."""
        # Decided on the groups' parameters: the lists of a sharded one hold its local shard, a plain tensor.
        if not (isinstance(state, StateDict) and all(plannable(group, group["params"]) for group, _ in built)):
            self.kept = None
            return [(entry, lists, None) for _, entries in built for entry, lists in entries]
        plans = [SplitPlan(group, entries, state, option_keys) for group, entries in built]
        self.kept = (state, tuple(group for group, _ in built), state.writes, plans)
        out = []
        for plan, (_, entries) in zip(plans, built, strict=True):
            out.extend((entry, lists, part.kernel) for (entry, lists), part in zip(entries, plan.parts, strict=True))
        return out
