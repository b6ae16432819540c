"""The optimizer's side of low-precision state (``state_precision``): options, state entries, loading.

A param group with ``state_precision`` ``"8bit"`` or ``"bfloat16"`` keeps the moments of each parameter of
at least ``state_min_size`` real elements in that format (:mod:`adoptim.kernels.lowbit`); smaller ones
(biases, norms) keep the default state and step with the group's usual kernel. A low-precision state entry
is plain tensors, flat over the parameter's real elements::

    "8bit":     step, exp_avg (uint8 codes), exp_avg_absmax (float32, one per block), exp_avg_sq,
                exp_avg_sq_absmax, rounding_seed (int64, 0-dim)
    "bfloat16": step, exp_avg (bfloat16), exp_avg_sq (bfloat16), rounding_seed

``rounding_seed`` keys the stochastic rounding (:mod:`adoptim.kernels.quant`): the parameter's position in
the optimizer, kept in the state so a resumed run draws the same numbers.

A sharded parameter (a DTensor whose placements are ``Shard(0)`` or ``Replicate``, as FSDP2 makes them) keeps
the state of its local shard, as DTensors laid out as the parameter: codes (or bfloat16 values) of the
parameter's shape, and 8-bit scales of shape ``(rows, row_elements / state_block_size)``. Its 8-bit blocks
are the whole parameter's blocks, which lie inside its rows: a parameter whose rows (the elements of one
index of dim 0) are not a whole number of blocks, or that is sharded otherwise, keeps full state (as a small
one). Each element draws the random number of its index in the whole parameter. So a shard steps exactly as
the same elements of the unsharded parameter, and torch.distributed.checkpoint reshards the state onto any
number of processes.

A state of another format (a 32-bit checkpoint loaded into an 8-bit optimizer, or the reverse, or a group
whose option was changed) is converted once, with nearest rounding, when it is loaded or first stepped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _validate as V
from ._plan import ParamState, StateDict
from .kernels.common import dtensor_type
from .kernels.lowbit import FORMATS, Stored, n_blocks
from .kernels.quant import dequantize_8bit, quantize_8bit

__all__ = ["STORAGE_KEYS", "build", "check", "load_entries", "place_loaded", "run_keys", "to_full"]

# The group options that say how state is stored: the run's own, like its layout, when a state_dict is loaded.
STORAGE_KEYS = ("state_precision", "state_block_size", "state_min_size")
_KERNEL_KEYS = ("foreach", "fused", "capturable", "differentiable")


def run_keys(group: dict[str, Any]) -> tuple[str, ...]:
    """The keys of the loading optimizer's ``group`` that a loaded group takes from it: the storage options,
    and with low-precision state the kernel choice too (a checkpoint of a fused full-precision run loads
    into an 8-bit one, whose kernel is another)."""
    return STORAGE_KEYS + _KERNEL_KEYS if group["state_precision"] != "full" else STORAGE_KEYS
check_options = V.check_state_precision
_CPU = torch.device("cpu")


def _kind(group: dict[str, Any], p: Tensor) -> str:
    """The format of ``p``'s state in ``group``: the group's precision, or "full" for a small tensor or a
    sharded one whose shards cannot hold it (:func:`_shardable`)."""
    precision = group.get("state_precision", "full")
    if precision == "full" or _numel(p) < group.get("state_min_size", 4096):
        return "full"
    if _is_dtensor(p) and not _shardable(p, precision, int(group.get("state_block_size", 256))):
        return "full"
    return precision


def _is_dtensor(t: Any) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _shardable(p: Tensor, kind: str, block: int) -> bool:
    """Whether the DTensor ``p`` can keep ``kind`` state of its local shard: a real tensor of at least one
    dimension sharded on dim 0 only (its shard a range of rows), with rows of whole 8-bit blocks. Decided by
    the global shape and placements alone, so every process and every number of processes decides alike."""
    from torch.distributed.tensor import Replicate, Shard

    if p.is_complex() or p.dim() == 0 or p.shape[0] == 0:
        return False
    if not all(type(pl) is Replicate or (type(pl) is Shard and pl.dim == 0) for pl in p.placements):
        return False
    return kind != "8bit" or (p.numel() // p.shape[0]) % block == 0


def _offset(p: Tensor) -> int:
    """The index, in the whole parameter, of the first element of ``p``'s local shard (0 for a plain tensor)."""
    if not _is_dtensor(p):
        return 0
    # The function DCP places shards with: the offsets of the shard it saves and loads.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * (p.numel() // p.shape[0]) if p.numel() else 0


def _like(p: Tensor, local: Tensor, per_row: int | None = None) -> Tensor:
    """``local`` (the flat state of ``p``'s local shard) as a DTensor laid out as ``p``: of ``p``'s shape,
    or with ``per_row`` values per row (8-bit scales)."""
    from torch.distributed.tensor import DTensor

    rows = p.to_local().shape[0]
    if per_row is None:
        shape, stride, local = p.shape, p.stride(), local.view(p.to_local().shape)
    else:
        shape, stride, local = (p.shape[0], per_row), (per_row, 1), local.view(rows, per_row)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _local(t: Any) -> Any:
    """A DTensor's local tensor, flat (any other value as it is)."""
    return t.to_local().reshape(-1) if _is_dtensor(t) else t


def _numel(p: Tensor) -> int:
    return p.numel() * 2 if p.is_complex() else p.numel()


def _where(gi: int, pi: int) -> str:
    return f"param group {gi} parameter {pi}"


def check_entry(entry: dict[str, Any], p: Tensor, kind: str, block: int, where: str) -> None:
    """Raise ``ValueError`` unless ``entry`` holds ``kind`` state of ``p`` (in blocks of ``block``): flat
    tensors, or for a sharded ``p`` DTensors laid out as ``p`` (see the module docstring)."""
    n, sharded = _numel(p), _is_dtensor(p)
    for name in ("exp_avg", "exp_avg_sq"):
        if sharded:
            shape = tuple(p.shape)
            want = [(name, torch.uint8 if kind == "8bit" else torch.bfloat16, shape)]
            if kind == "8bit":
                want.append((name + "_absmax", torch.float32, (shape[0], n // shape[0] // block)))
        elif kind == "8bit":
            want = [(name, torch.uint8, (n,)), (name + "_absmax", torch.float32, (n_blocks(n, block),))]
        else:
            want = [(name, torch.bfloat16, (n,))]
        for key, dtype, shape in want:
            t = entry.get(key)
            if (not torch.is_tensor(t) or t.dtype != dtype or tuple(t.shape) != shape or _is_dtensor(t) != sharded
                    or (sharded and (t.placements != p.placements or t.device_mesh != p.device_mesh))):
                got = f"{t.dtype} of shape {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                if _is_dtensor(t) or (sharded and torch.is_tensor(t)):
                    got = f"a {type(t).__name__} of {got}" + (f" placed {t.placements}" if _is_dtensor(t) else "")
                layout = f" (a DTensor placed {p.placements}, as its parameter)" if sharded else ""
                raise ValueError(
                    f"state of {where} does not match it: its {kind} state ({n} elements, blocks of {block}) "
                    f"needs {key} of {dtype} of shape {shape}{layout}, got {got}"
                )
    seed = entry.get("rounding_seed")
    if not torch.is_tensor(seed) or seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"state of {where} does not match it: its {kind} state needs a one-element int64 "
                         f"rounding_seed, got {seed!r}")


def _detect(entry: dict[str, Any], p: Tensor) -> str:
    """The format a state entry holds (for an entry made under another option than the group's now): a
    low-precision entry has a ``rounding_seed``, an 8-bit one its scales too."""
    if "exp_avg_absmax" in entry:
        return "8bit"
    return "bfloat16" if "rounding_seed" in entry else "full"


def _moments32(entry: dict[str, Any], p: Tensor, kind: str, block: int) -> tuple[Tensor, Tensor]:
    """The entry's moments as flat float32 tensors over ``p``'s real elements."""
    out = []
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        t = _local(entry[name])  # a shard's: over its local elements
        if kind == "8bit":
            out.append(dequantize_8bit(t, _local(entry[name + "_absmax"]), signed, block))
        elif kind == "full":
            out.append((torch.view_as_real(t) if t.is_complex() else t).reshape(-1).float())
        else:
            out.append(t.float())
    return out[0], out[1]


def convert(entry: dict[str, Any], p: Tensor, source: str, target: str, source_block: int, block: int,
            seed: int) -> dict[str, Any]:
    """``entry`` (``source`` state of ``p``) as ``target`` state, on ``p``'s device: the same entry when
    nothing changes, else moments converted once with nearest rounding."""
    if source == target and source_block == block:
        return entry
    m, v = (x.to(p.device) for x in _moments32(entry, p, source, source_block))
    out = {k: val for k, val in entry.items() if k not in _MOMENT_KEYS}
    sharded = _is_dtensor(p)
    if target == "full":
        if sharded:  # a shard's full state: of its parameter's dtype and layout
            out["exp_avg"], out["exp_avg_sq"] = (_like(p, x.to(p.dtype)) for x in (m, v))
        else:
            real = torch.view_as_real(p) if p.is_complex() else p
            for name, x in (("exp_avg", m), ("exp_avg_sq", v)):
                x = x.view(real.shape).to(real.dtype)
                out[name] = (torch.view_as_complex(x) if p.is_complex() else x).contiguous()
        out.pop("rounding_seed", None)
        return out
    for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        if target == "8bit":
            out[name], out[name + "_absmax"] = quantize_8bit(x, signed, block, None)
        else:
            out[name] = x.to(torch.bfloat16)
    if sharded:
        _shard_entry(out, p, block)
    if "rounding_seed" not in out:
        out["rounding_seed"] = torch.tensor(seed, dtype=torch.int64)
    return out


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def _new_entry(p: Tensor, kind: str, block: int, seed: int) -> dict[str, Any]:
    n = p.to_local().numel() if _is_dtensor(p) else _numel(p)
    fmt = FORMATS[kind]
    entry: dict[str, Any] = {"step": torch.zeros((), dtype=V.scalar_dtype())}
    for name, mf, signed in (("exp_avg", fmt.m, True), ("exp_avg_sq", fmt.v, False)):
        st = Stored.empty(n, mf, signed=signed, block_size=block, seed=seed, stream=0, device=p.device)
        entry[name] = st.data
        if st.absmax is not None:
            entry[name + "_absmax"] = st.absmax
    if _is_dtensor(p):
        _shard_entry(entry, p, block)
    entry["rounding_seed"] = torch.tensor(seed, dtype=torch.int64)  # a plain tensor: the same in every shard
    return entry


def _shard_entry(entry: dict[str, Any], p: Tensor, block: int) -> None:
    """Make the flat local moments of the DTensor ``p``'s entry DTensors laid out as ``p`` (in place)."""
    for name in ("exp_avg", "exp_avg_sq"):
        entry[name] = _like(p, entry[name])
        if name + "_absmax" in entry:
            entry[name + "_absmax"] = _like(p, entry[name + "_absmax"], p.numel() // p.shape[0] // block)


def _stored(entry: dict[str, Any], kind: str, block: int, offset: int = 0) -> tuple[Stored, Stored]:
    """The entry's moments as records of flat tensors (a shard's local ones, whose first element is the
    parameter's element ``offset``)."""
    fmt, seed = FORMATS[kind], int(entry["rounding_seed"])
    m, v, m_absmax, v_absmax = (_local(entry.get(k)) for k in _MOMENT_KEYS)
    return (Stored(m, m_absmax, fmt.m, signed=True, block_size=block, seed=seed, stream=0, offset=offset),
            Stored(v, v_absmax, fmt.v, signed=False, block_size=block, seed=seed, stream=1, offset=offset))


def _seeds(groups: list[dict[str, Any]]) -> dict[int, int]:
    """Each parameter's position in the optimizer (its state_dict key), by ``id``."""
    out: dict[int, int] = {}
    for group in groups:
        for p in group["params"]:
            out.setdefault(id(p), len(out))
    return out


def check(opt: Any, groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int, list[tuple]]]:
    """Check the parameters with gradients of the low-precision ``groups`` and their state; raise before
    anything changes (``RuntimeError`` for state that does not fit, as ``ADOPT._init_group``)."""
    state = opt.state
    out = []
    for gi, g in enumerate(opt.param_groups):
        if not any(g is x for x in groups):
            continue
        try:
            check_options(g)
        except ValueError as exc:
            raise ValueError(f"param group {gi}: {exc}") from None
        block = int(g["state_block_size"])
        items = []
        for pi, p in enumerate(g["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"ADOPT does not support sparse gradients ({_where(gi, pi)}); "
                                   "use dense gradients, e.g. nn.Embedding(sparse=False)")
            st = state.get(p)
            source = _detect(st, p) if st else None
            if _is_dtensor(p) != _is_dtensor(grad):
                raise RuntimeError(f"the gradient of {_where(gi, pi)} is a {type(grad).__name__}, its parameter "
                                   f"a {type(p).__name__}")
            if source == "full":
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if m.shape != p.shape or v.shape != p.shape:
                    raise RuntimeError(
                        f"state of {_where(gi, pi)} does not match it: parameter shape {tuple(p.shape)}, "
                        f"exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}")
            elif source is not None:
                try:
                    check_entry(st, p, source, block, _where(gi, pi))
                except ValueError as exc:
                    raise RuntimeError(str(exc)) from None
            items.append((p, grad, _kind(g, p), source))
        out.append((g, block, items))
    return out


def build(opt: Any, checked: list[tuple[dict[str, Any], int, list[tuple]]]) -> list[tuple[dict, list[tuple]]]:
    """The step lists of what :func:`check` passed, making or converting state: per group, ``(group,
    entries)`` with one entry ``(entry group, lists)`` for its small parameters (the usual state; a copy of the
    group saying ``state_precision="full"``) and one for its low-precision ones, with
    :class:`~adoptim.kernels.lowbit.Stored` records for the moments (either left out when it has none)."""
    state = opt.state
    seeds = None
    out: list[tuple[dict, list[tuple]]] = []
    for g, block, items in checked:
        full: list[list[Any]] = [[], [], [], [], []]
        low: list[list[Any]] = [[], [], [], [], []]
        for p, grad, kind, source in items:
            st = state.get(p)
            if source != kind:
                seeds = seeds or _seeds(opt.param_groups)
                if source is None:
                    new = _new_entry(p, kind, block, seeds[id(p)]) if kind != "full" else _full_entry(p)
                else:
                    new = convert(dict(st), p, source, kind, block, block, seeds[id(p)])
                st = _put(state, p, new)
            if kind == "full":
                moments = st["exp_avg"], st["exp_avg_sq"]
                lists = full
            else:
                moments = _stored(st, kind, block, _offset(p))
                lists = low
                if _is_dtensor(p):  # the kernel steps the local shard (in place: the DTensor's own storage)
                    if grad.placements != p.placements:
                        grad = grad.redistribute(p.device_mesh, p.placements)
                    p, grad = p.to_local(), grad.to_local()
            for lst, x in zip(lists, (p, grad, *moments, st["step"]), strict=True):
                lst.append(x)
        entries: list[tuple] = []
        if full[0]:
            entries.append(({**g, "state_precision": "full"}, full))
        if low[0]:
            entries.append((g, low))
        out.append((g, entries))
    return out


def _full_entry(p: Tensor) -> dict[str, Any]:
    return {"step": torch.zeros((), dtype=V.scalar_dtype()), "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros_like(p)}


def _put(state: Any, p: Tensor, entry: dict[str, Any]) -> dict[str, Any]:
    """Set ``p``'s entry in ``opt.state`` (as the optimizer's own entries are: counting their writes)."""
    entry = ParamState(state, entry) if isinstance(state, StateDict) else entry
    state[p] = entry
    return entry


def load_entries(saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]],
                 param_groups: list[dict[str, Any]]) -> tuple[dict[Any, Any], dict[int, tuple[dict, str, int]]]:
    """Split a saved state into the entries torch.optim may load as they are and the low-precision ones
    (which its load would cast to the parameter's dtype), checking the latter against the parameters.

    Returns the state without them and, by the parameter's ``id``, ``(entry, format, block size)``.
    """
    rest = dict(saved_state)
    low: dict[int, tuple[dict, str, int]] = {}
    if len(saved_groups) != len(param_groups):  # migration.check_state_matches says so, next
        return rest, low
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            continue
        try:
            check_options(saved)
        except ValueError as exc:
            raise ValueError(f"param group {gi} of the state_dict: {exc}") from None
        block = int(saved.get("state_block_size", 256))
        for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
            entry = saved_state.get(key)
            if not isinstance(entry, dict) or not entry:
                continue
            # The entry's own format: a sharded and an unsharded run may keep one parameter's state in two.
            kind = _detect(entry, p)
            if saved.get("state_precision") == "8bit" and kind != "8bit" and _cast_codes(entry):
                raise ValueError(
                    f"state of {_where(gi, pi)} is 8-bit codes cast to {_local(entry['exp_avg']).dtype} without "
                    f"their scales: its group saved 8-bit state, and exp_avg and exp_avg_sq hold integers in "
                    f"0..255 with no exp_avg_absmax (a checkpoint loaded through the state layout of an optimizer "
                    f"of another state_precision, as torch.distributed.checkpoint does); load it into a new "
                    f"optimizer with state_precision='8bit' and the same state_block_size, then change the "
                    f"group's state_precision (its state is converted at the next step)"
                )
            if kind == "full":
                continue
            entry = entry if _is_dtensor(p) else _unshard(entry, p)
            check_entry(entry, p, kind, block, _where(gi, pi))
            rest.pop(key)
            low[id(p)] = (entry, kind, block)
    return rest, low


def _cast_codes(entry: dict[str, Any]) -> bool:
    """Whether ``entry``'s moments are 8-bit codes cast to a float dtype (as a distributed checkpoint loads
    them into another format's tensors): every value of both an integer in 0..255, the signed codes of m not
    all 0. Moments an optimizer computes are not: m is exactly 0 everywhere after the first step and fractional
    after it, and the signed map's code of 0 is not 0."""
    m, v = (_local(entry.get(k)) for k in ("exp_avg", "exp_avg_sq"))
    if not all(torch.is_tensor(t) and t.is_floating_point() and t.numel() for t in (m, v)):
        return False
    return bool(m.any()) and all(bool(((t >= 0) & (t <= 255) & (t == t.round())).all()) for t in (m, v))


def _unshard(entry: dict[str, Any], p: Tensor) -> dict[str, Any]:
    """A sharded run's entry gathered whole (``get_state_dict`` with ``full_state_dict=True``: codes of the
    parameter's shape, scales per row) as the flat entry of the same blocks; any other entry as it is."""
    m = entry.get("exp_avg")
    if p.dim() < 2 or not torch.is_tensor(m) or m.shape != p.shape:
        return entry
    return {k: (v.reshape(-1) if k in _MOMENT_KEYS and torch.is_tensor(v) else v) for k, v in entry.items()}


def to_full(opt: Any, group: dict[str, Any], p: Tensor) -> dict[str, Any] | None:
    """``p``'s state made full precision, if it is low-precision state (a group switched back to "full"):
    dequantized once in place of the entry, which is returned; ``None`` (nothing changed) for other state."""
    entry = opt.state.get(p)
    source = _detect(entry, p) if entry else "full"
    if source == "full":
        return None
    block = int(group.get("state_block_size", 256))
    check_entry(entry, p, source, block, "a parameter")
    out = convert(dict(entry), p, source, "full", block, block, 0)
    if torch.is_tensor(out.get("step")):  # where the group's kernel keeps steps (as ADOPT._create_state)
        device = p.device if group["capturable"] or group["fused"] else _CPU
        out["step"] = out["step"].to(dtype=V.scalar_dtype(), device=device)
    return _put(opt.state, p, out)


def place_loaded(opt: Any, low: dict[int, tuple[dict, str, int]]) -> None:
    """After torch.optim's load: every parameter's state in its group's format (converted once), the
    low-precision entries of the saved state included."""
    seeds = _seeds(opt.param_groups)
    for group in opt.param_groups:
        block = int(group.get("state_block_size", 256))
        for p in group["params"]:
            kind = _kind(group, p)
            if id(p) in low:
                entry, source, source_block = low[id(p)]
                entry = {k: (v.to(p.device) if torch.is_tensor(v) and k not in ("step", "rounding_seed") else v)
                         for k, v in entry.items()}
                if torch.is_tensor(entry.get("step")):  # where the group's kernel keeps steps (as ADOPT._create_state)
                    device = p.device if group["capturable"] or group["fused"] else _CPU
                    entry["step"] = entry["step"].to(dtype=V.scalar_dtype(), device=device)
                _put(opt.state, p, convert(entry, p, source, kind, source_block, block, seeds[id(p)]))
                continue
            st = opt.state.get(p)
            if st and kind != "full":
                _put(opt.state, p, convert(dict(st), p, "full", kind, block, block, seeds[id(p)]))
