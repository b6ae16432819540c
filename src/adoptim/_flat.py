"""The opt-in flat layout (``flat=True``): one buffer per (param group, device, dtype), one kernel call per step.

With ``flat=True`` a param group's parameters become views into one flat buffer per (device, dtype), and
so do their gradients (which stay views: ``opt.zero_grad()`` zeroes the buffer in place, and backward
accumulates into it) and their state. A step is then one kernel call per buffer, whatever the number of
tensors, and the host work per tensor is a check that each parameter still has its place (its data and its
gradient are the buffer's views), about three ``map`` calls. The layout of DeepSpeed's and apex's flat
groups and of FSDP's flat parameters.

What it changes, as with those libraries:

* every parameter of the group steps at every step: its gradient is a view into the flat gradient buffer,
  zero where backward did not reach it (in the default layout a ``None`` gradient skips the parameter);
  so the group's parameters must all require grad, and their step counters are equal;
* ``opt.zero_grad()`` zeroes the gradient buffer whatever ``set_to_none`` says; a gradient replaced by
  another tensor (or set to ``None``: zero) is copied into the buffer at the next step, which costs a copy
  per such tensor (``model.zero_grad()`` sets them to ``None``: prefer ``opt.zero_grad()``);
* parameters become contiguous views of one buffer (a ``channels_last`` parameter becomes contiguous);
  tensors that share memory are refused by some savers (safetensors): clone them to save them there;
* replacing a parameter's ``.data`` (``model.to(...)``), its gradient's or a state tensor's ends the flat layout of that
  group, with a warning; the optimizer then goes on in the default layout.

``state_dict()`` has the default layout's format (one step tensor per parameter) and loads into either.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from itertools import chain
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import _validate as V
from .kernels.common import PLAIN_TENSOR_TYPES
from .kernels.contract import KernelPlan
from .kernels.facts import kept_facts

_grad = attrgetter("grad")
_ptr = Tensor.data_ptr
_numel = Tensor.numel


def check_flat_params(params: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless these parameters can be flattened (at construction, before anything changes)."""
    seen: set[int] = set()
    for i, p in enumerate(params):
        if type(p) not in PLAIN_TENSOR_TYPES:
            raise ValueError(f"Invalid flat: True for parameter {i}, a {type(p).__name__} (plain tensors only)")
        if not p.requires_grad:
            raise ValueError(
                f"Invalid flat: True for parameter {i}, which does not require grad: every parameter of a flat "
                "group steps at every step; put frozen parameters in a group with flat=False"
            )
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"Invalid flat: True for parameter {i} of dtype {p.dtype}")
        if id(p) in seen:
            raise ValueError(f"Invalid flat: True for parameter {i}, listed twice")
        seen.add(id(p))


def common_step(entries: Iterable[Any], what: str) -> float | None:
    """The step the states of a flat group's parameters share (``None``: none has state yet).

    Raises ``ValueError`` (``what``, then the steps) when they differ or only some parameters have state.
    """
    steps = {float(e["step"]) if e else None for e in entries}
    if len(steps) > 1:
        listed = sorted(steps, key=lambda x: -1.0 if x is None else x)
        raise ValueError(f"{what}, but the steps of its parameters differ: {listed}")
    return next(iter(steps), None)


class Bucket:
    """The parameters of one param group on one (device, dtype), their gradients and state, as flat buffers."""

    __slots__ = ("params", "spans", "flat_p", "flat_g", "grad_views", "flat_m", "flat_v", "step", "m_views",
                 "v_views", "facts", "ptrs", "numels", "m_ptrs", "v_ptrs", "step_ptr", "kernel")

    def __init__(self, params: list[Tensor]) -> None:
        first = params[0]
        total = sum(p.numel() for p in params)
        self.params = params
        self.spans = []
        offset = 0
        for p in params:
            self.spans.append((offset, p.numel(), p.shape))
            offset += p.numel()
        with torch.no_grad():
            self.flat_p = torch.empty(total, dtype=first.dtype, device=first.device)
            self.flat_g = torch.zeros(total, dtype=first.dtype, device=first.device)
            for p, view in zip(params, self._views(self.flat_p), strict=True):
                view.copy_(p.detach())
                p.data = view
            self.grad_views = self._views(self.flat_g)
            for p, view in zip(params, self.grad_views, strict=True):
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
        self.ptrs = list(map(_ptr, chain(params, self.grad_views)))
        self.numels = list(map(_numel, params))
        self.flat_m = self.flat_v = self.step = None
        self.m_views: list[Tensor] = []
        self.v_views: list[Tensor] = []
        self.m_ptrs: list[int] = []
        self.v_ptrs: list[int] = []
        self.step_ptr = 0
        self.kernel = KernelPlan()
        self._record()

    def _record(self) -> None:
        """Record the facts :meth:`current` checks: in one C call per step where the library allows
        (``kernels/facts.py``), else the data pointers and sizes, read in Python."""
        state = [*self.m_views, *self.v_views, self.step] if self.step is not None else []
        self.facts = kept_facts([], self.params, self.grad_views, state)

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o: o + n].view(shape) for o, n, shape in self.spans]

    def create_state(self, state: dict, on_device: bool) -> None:
        """The state of every parameter, as views into flat buffers, with one shared step counter."""
        p = self.flat_p
        self.flat_m, self.flat_v = torch.zeros_like(p), torch.zeros_like(p)
        self.step = torch.zeros((), dtype=V.scalar_dtype(), device=p.device if on_device else "cpu")
        self.m_views, self.v_views = self._views(self.flat_m), self._views(self.flat_v)
        self.m_ptrs, self.v_ptrs = list(map(_ptr, self.m_views)), list(map(_ptr, self.v_views))
        self.step_ptr = self.step.data_ptr()
        self._record()
        self.adopt_state(state)

    def adopt_state(self, state: dict) -> None:
        """Make each parameter's state entry the buffers' views, taking over the values an entry holds
        (after ``load_state_dict``, or a state tensor set by hand). Raises when the entries' steps differ."""
        entries = [state.get(p) for p in self.params]
        step = common_step(entries, "a flat param group's parameters step together")
        with torch.no_grad():
            if step is not None:
                self.step.copy_(torch.tensor(step))
            for p, e, m, v in zip(self.params, entries, self.m_views, self.v_views, strict=True):
                if e:
                    if e["exp_avg"] is not m:
                        m.copy_(e["exp_avg"])
                    if e["exp_avg_sq"] is not v:
                        v.copy_(e["exp_avg_sq"])
                state[p] = {"step": self.step, "exp_avg": m, "exp_avg_sq": v}

    def current(self) -> list[list[Tensor]] | None:
        """This step's lists (one tensor each), or ``None`` when the layout no longer holds."""
        if not self.holds():
            return None
        params = self.params
        grads = list(map(_grad, params))
        if not all(map(is_, grads, self.grad_views)):
            self._take_grads(grads)
        return [[self.flat_p], [self.flat_g], [self.flat_m], [self.flat_v], [self.step]]

    def holds(self) -> bool:
        """Whether every parameter, gradient view and state view still has its place in the buffers."""
        if self.facts is not None:
            # Their facts (address, size, dtype, layout) in one C call.
            return self.facts.check([]) is not None
        params = self.params
        return not (list(map(_ptr, chain(params, self.grad_views))) != self.ptrs
                    or list(map(_numel, params)) != self.numels
                    or self.step is not None and (list(map(_ptr, self.m_views)) != self.m_ptrs
                                                  or list(map(_ptr, self.v_views)) != self.v_ptrs
                                                  or self.step.data_ptr() != self.step_ptr))

    def _take_grads(self, grads: list[Tensor | None]) -> None:
        """Copy gradients that are not the buffer's views into it (``None``: zero) and put the views back."""
        with torch.no_grad():
            for p, g, view in zip(self.params, grads, self.grad_views, strict=True):
                if g is view:
                    continue
                if g is None:
                    view.zero_()
                else:
                    if g.is_sparse:
                        raise RuntimeError("ADOPT does not support sparse gradients (flat param group)")
                    view.copy_(g)
                p.grad = view

    def zero_grad(self) -> None:
        if not self.holds():
            # The layout ends at the next step (FlatGroups.unflatten): start it from fresh gradients, as
            # zero_grad(set_to_none=True) does in the default layout.
            for p in self.params:
                p.grad = None
            return
        grads = list(map(_grad, self.params))
        if not all(map(is_, grads, self.grad_views)):
            for p, view in zip(self.params, self.grad_views, strict=True):
                p.grad = view
        self.flat_g.zero_()


def _make_buckets(group: dict[str, Any]) -> list[Bucket]:
    """A flat group's buckets: its parameters by (device, dtype), in order."""
    by_key: dict[tuple, list[Tensor]] = {}
    for p in group["params"]:
        by_key.setdefault((p.device, p.dtype), []).append(p)
    return [Bucket(params) for params in by_key.values()]


class FlatGroups:
    """An optimizer's flat groups: their buckets, and the write count of ``opt.state`` last adopted.

    Buckets are found by the group's ``params`` list, which ``load_state_dict`` keeps while it replaces
    the group dicts themselves.
    """

    def __init__(self) -> None:
        self.registry: dict[int, tuple[list, list[Bucket]]] = {}
        self.seen: tuple | None = None  # (state, its write count) after the last step

    def add(self, group: dict[str, Any]) -> None:
        """Lay a group out flat (at ``add_param_group``; the group's parameters were checked)."""
        self.registry[id(group["params"])] = (group["params"], _make_buckets(group))

    def _entry(self, group: dict[str, Any]) -> list[Bucket] | None:
        entry = self.registry.get(id(group["params"]))
        return entry[1] if entry is not None and entry[0] is group["params"] else None

    def buckets(self, flat: list[dict[str, Any]], param_groups: list[dict[str, Any]],
                state: Any) -> list[tuple[dict[str, Any], Bucket]]:
        """The buckets of the flat groups, checked (and this step's gradients taken into their buffers).

        A group whose layout no longer holds (a parameter's or state tensor's data replaced) goes on in
        the default layout, with a warning; one whose params list changed, or of an unpickled optimizer,
        is laid out again. After ``opt.state`` was written (``load_state_dict``, an entry set by hand), the
        buckets take the entries' values into their buffers.
        """
        state_changed = self.seen is None or self.seen[0] is not state or self.seen[1] != state.writes
        out = []
        for group in flat:
            buckets = self._entry(group)
            if buckets is None:
                check_flat_params(group["params"])
                self.add(group)
                buckets = self.registry[id(group["params"])][1]
                state_changed = True
            if any(bucket.current() is None for bucket in buckets):
                self.unflatten(group, param_groups, state)
                continue
            for bucket in buckets:
                if state_changed and (bucket.step is not None or any(state.get(p) for p in bucket.params)):
                    if bucket.step is None:
                        bucket.create_state(state, group["capturable"] or group["fused"])
                    else:
                        bucket.adopt_state(state)
                out.append((group, bucket))
        return out

    def lists(self, buckets: list[tuple[dict[str, Any], Bucket]], state: Any) -> list[tuple]:
        """(group, lists, kernel plan) per bucket, creating the state of a group's first step."""
        out = []
        for group, bucket in buckets:
            if bucket.step is None:
                bucket.create_state(state, group["capturable"] or group["fused"])
            # The step updates the buffer in place; each parameter (a view by .data, so with a version
            # counter of its own) must count it too, so that autograd refuses a backward through a graph
            # that saved a parameter before the step, as it does in the default layout.
            increment_version(bucket.params)
            out.append((group, [[bucket.flat_p], [bucket.flat_g], [bucket.flat_m], [bucket.flat_v], [bucket.step]],
                        bucket.kernel))
        self.seen = (state, state.writes)
        return out

    def unflatten(self, group: dict[str, Any], param_groups: list[dict[str, Any]], state: Any) -> None:
        """End a flat group's layout: each parameter gets a step counter of its own, and the default layout
        takes over (the tensors stay views, which every kernel takes)."""
        gi = next(i for i, g in enumerate(param_groups) if g is group)
        warnings.warn(
            f"param group {gi}: a parameter's or a state tensor's data was replaced, which ends the group's flat "
            "layout; the optimizer goes on in the default layout",
            RuntimeWarning,
            stacklevel=5,
        )
        self.registry.pop(id(group["params"]), None)
        group["flat"] = False
        for p in group["params"]:
            st = state.get(p)
            if st and torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()

    def zero_grad(self, flat: list[dict[str, Any]]) -> None:
        for group in flat:
            for bucket in self._entry(group) or ():
                bucket.zero_grad()
