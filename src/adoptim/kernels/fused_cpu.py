"""The fused CPU kernel: a whole ADOPT step over every tensor in one pass over memory.

The arithmetic lives in ``csrc/`` (``elementwise.c`` the loops, ``threads.c`` the threads, ``step.c`` the
exported call), a small C library built at install time and called here through ctypes on raw data
pointers. One call updates all tensors: the elements of all of them are cut
into equal shares, one per torch thread, and each element is read and written once (read p, g, m, v;
write p, m, v). float32 and float64 are computed in their own precision; bfloat16 and float16 are
widened to float32 and rounded once when stored, and their state stays in the parameter's dtype.

Tensors the C loops cannot take (not on the CPU, an unsupported dtype, parameter and state laid out
differently) are returned to the dispatcher, which updates them with the for-loop kernel in the same
call; when the library was not built, the dispatcher runs the foreach kernel instead, after one warning.

The host checks every tensor and builds the C call's table of addresses: the usual case (plain contiguous
CPU tensors) a whole list at a time (``_bulk_table``, each check one ``map`` in C), anything else one
tensor at a time (``_table_per_tensor``). A tensor's storage, dtype or layout can change under the same
Python object (``t.data = ...``), and the C loops write through the addresses, so a table is only reused
under a caller's :class:`~adoptim.kernels.contract.KernelPlan`, whose promise covers the parameters and
state; the gradients are checked again at every call, and only their row is rewritten.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import warnings
from array import array
from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .common import PLAIN_TENSOR_TYPES, dtensor_type, state_holds
from .contract import FUSED_REAL_DTYPES, Hyper, KernelPlan

__all__ = ["fused_cpu_adopt", "is_available", "library"]

# Parameter dtype -> code of the C loops (complex tensors are viewed as their real dtype first); the
# order of FUSED_REAL_DTYPES is the C side's enum (DT_F32, DT_F64, DT_BF16, DT_F16).
_PARAM_CODES = {dtype: code for code, dtype in enumerate(FUSED_REAL_DTYPES)}
_STEP_CODES = {torch.float32: 0, torch.float64: 1}
# (p, g, m, v, step) dtypes -> the code passed to C: parameter code | step code << 8.
_CODES = {(d, d, d, d, sd): c | sc << 8 for d, c in _PARAM_CODES.items() for sd, sc in _STEP_CODES.items()}
# (parameter dtype, step dtype) -> the same code, for the whole-list fast path.
_BULK_CODES = {(d, sd): c | sc << 8 for d, c in _PARAM_CODES.items() for sd, sc in _STEP_CODES.items()}


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel, or ``None`` and why not."""
    spec = importlib.util.find_spec("adoptim.kernels._adopt_cpu")
    error = "the compiled library is missing (no C compiler when adoptim was installed?)"
    if spec is not None and spec.origin:
        try:
            lib = ctypes.CDLL(spec.origin)
            lib.adopt_cpu_step.restype = ctypes.c_int
            lib.adopt_cpu_step.argtypes = [
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double,
                ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                ctypes.c_int, ctypes.c_double, ctypes.c_int,
            ]
            lib.adopt_bench_bandwidth_bound.restype = None
            lib.adopt_bench_bandwidth_bound.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int]
            return lib, ""
        except (OSError, AttributeError) as exc:
            error = f"the compiled library could not be loaded ({exc})"
    return None, error


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` after one warning when the installation could not build it."""
    lib, error = _load()
    if lib is not None:
        return lib
    warnings.warn(
        f"adoptim's fused CPU kernel is unavailable: {error}. The foreach kernel runs instead; "
        "reinstall adoptim with a C compiler present to get the fused kernel.",
        RuntimeWarning,
        stacklevel=5,
    )
    return None


# Loaded when adoptim is imported, not at the first step: the library's fork handler, which makes a
# child made by fork start its own threads (torch's OpenMP team stays behind in the parent), exists only
# once the library is loaded, and a child that loaded it first would join the parent's team and hang.
_load()


def _local_shards(dtensor: type, p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, ...] | None:
    """The local tensors of four DTensors laid out alike (same mesh and placements), else None."""
    for x in (g, m, v):
        if not isinstance(x, dtensor) or x.device_mesh != p.device_mesh or x.placements != p.placements:
            return None
    return tuple(x.to_local() for x in (p, g, m, v))


def is_available() -> bool:
    """Whether the compiled kernel is installed and loads (silently: used to pick the default kernel)."""
    return _load()[0] is not None


def _code(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor) -> int | None:
    """The C loops' code for this tensor, or ``None`` when they cannot take it.

    They take CPU tensors of a supported dtype (the same in p, g, m and v) laid out alike: all
    contiguous, or another dense layout (channels_last) with the same strides in all four.
    """
    code = _CODES.get((p.dtype, g.dtype, m.dtype, v.dtype, s.dtype))
    if code is None or not (p.is_cpu and g.is_cpu and m.is_cpu and v.is_cpu and s.is_cpu) or s.numel() != 1:
        return None
    if p.is_neg() or g.is_neg() or m.is_neg() or v.is_neg() or s.is_neg():
        return None  # a lazy negation: memory holds -x (see _bulk_table)
    if p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous():
        return code
    stride = p.stride()
    dense = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
    return code if dense and g.stride() == stride and m.stride() == stride and v.stride() == stride else None


def _no_memory_error(i: int | None) -> ValueError:
    which = "a tensor" if i is None else f"tensor {i}"
    return ValueError(
        f"{which}: a parameter, gradient or state tensor with elements has no memory (data_ptr() is 0, e.g. a "
        "ZeroTensor gradient); the fused kernel cannot update it, and nothing was changed"
    )


def _shape_error(i: int, p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> ValueError:
    return ValueError(
        f"tensor {i}: parameter {tuple(p.shape)}, gradient {tuple(g.shape)}, exp_avg "
        f"{tuple(m.shape)} and exp_avg_sq {tuple(v.shape)} must have the same shape"
    )


def fused_cpu_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
) -> Sequence[int]:
    """One ADOPT step on CPU tensors, in place (the kernel contract of :mod:`.contract`).

    Returns the indices of the tensors the C loops did not take, for the for-loop kernel. Takes AMP's
    ``grad_scale`` (the gradients are divided by it; the gradient tensors are left as they are) and
    ``found_inf`` (when nonzero the whole call changes nothing, steps included). ``capturable`` has no
    effect on the CPU, where reading a step costs no synchronisation. Needs the compiled library
    (:func:`is_available`); the dispatcher checks.

    With a ``plan`` (see :class:`~adoptim.kernels.contract.KernelPlan`), the table built for the whole
    list is kept, and a later call with the same plan only checks the gradients (plain contiguous
    tensors of the parameters' dtypes and sizes, not lazily negated) and writes their addresses into it.
    """
    if not params:
        return ()
    grad_scale, found_inf = hyper.grad_scale, hyper.found_inf
    if found_inf is not None and float(found_inf) != 0.0:
        return ()
    lib = library()
    n = len(params)
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    kept = plan.data if plan is not None else None
    checked = plan.grads if plan is not None else None
    if type(kept) is _KeptTable and kept.n == n and checked is not None and checked[0] == id(grads):
        table = kept.table  # the caller checked these gradients as kept.takes does, and read their addresses
        table[n: 2 * n] = checked[1]
    elif type(kept) is _KeptTable and kept.n == n and kept.takes(grads):
        table = kept.table
        table[n: 2 * n] = array("q", map(_ptr, grads))
    else:
        table = _bulk_table(*lists)
        if plan is not None:
            plan.data = None if table is None else _KeptTable(table, params)
    fast: list[int] | range = range(n)
    rest: list[int] = []
    if table is None:
        fast, rows = _table_per_tensor(*lists)
        if len(fast) < n:
            rest = sorted(set(range(n)) - set(fast))
        if not fast:
            return rest
        table = array("q", [x for row in rows for x in row])
    address, _ = table.buffer_info()
    clip = hyper.clip_exponent
    status = lib.adopt_cpu_step(
        len(fast), address, float(hyper.lr), hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
        int(hyper.decoupled_weight_decay), int(clip is not None), 0.0 if clip is None else float(clip),
        int(hyper.maximize), int(grad_scale is not None), 1.0 if grad_scale is None else float(grad_scale),
        torch.get_num_threads(),
    )
    if status == 2:  # only from the whole-list table: the per-tensor one was checked, with no update yet
        raise _no_memory_error(None)
    if status == 1:
        # Two parameters share memory (one listed twice, or views of one buffer): the threads of the C
        # call would update it at once, so the for-loop kernel updates them one after the other.
        return sorted([*fast, *rest])
    if status != 0:
        raise MemoryError("the fused CPU kernel could not allocate its bookkeeping; nothing was changed")
    # The C loops write behind autograd's back: bump the parameters' version counters as an in-place
    # operation does, so a backward through a graph that saved a parameter before this step is refused
    # rather than silently using the new values (about 50 ns a tensor).
    increment_version(params if len(fast) == n else [params[i] for i in fast])
    return rest


_dtype = attrgetter("dtype")
_shape = attrgetter("shape")
_is_cpu = attrgetter("is_cpu")
_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contiguous = Tensor.is_contiguous
_is_neg = Tensor.is_neg


class _KeptTable:
    """A whole-list table kept in a plan, with what a new list of gradients must match to reuse it."""

    __slots__ = ("table", "n", "dtypes", "numels")

    def __init__(self, table: array, params: list[Tensor]) -> None:
        self.table, self.n = table, len(params)
        self.dtypes = list(map(_dtype, params))
        self.numels = list(map(_numel, params))

    def takes(self, grads: list[Tensor]) -> bool:
        """Whether the table's checks hold for these gradients (the parameters and state are the plan's)."""
        return (set(map(type, grads)) <= PLAIN_TENSOR_TYPES and list(map(_dtype, grads)) == self.dtypes
                and list(map(_numel, grads)) == self.numels and all(map(_contiguous, grads))
                and not any(map(_is_neg, grads)))


def _bulk_table(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                state_steps: list[Tensor]) -> array | None:
    """The C call's table when every tensor is a plain contiguous CPU tensor the loops take, else None.

    The common case, checked a whole list at a time (each ``map`` runs in C, about 50 ns a tensor),
    so the host work per tensor stays far below the per-tensor loop's; anything unusual (a complex or
    channels_last parameter, a DTensor, a mismatch to report) returns None for the per-tensor loop.
    """
    dtensor = dtensor_type()
    if dtensor is not None and any(issubclass(t, dtensor) for t in set(map(type, params))):
        return None
    tensors = (params, grads, exp_avgs, exp_avg_sqs)
    dtypes = list(map(_dtype, params))
    step_dtypes = list(map(_dtype, state_steps))
    if len(set(dtypes)) == 1 and len(set(step_dtypes)) == 1:  # the usual case: one code for all
        codes = [_BULK_CODES.get((dtypes[0], step_dtypes[0]))] * len(dtypes)
    else:
        codes = list(map(_BULK_CODES.get, zip(dtypes, step_dtypes)))
    if None in codes or any(list(map(_dtype, x)) != dtypes for x in tensors[1:]):
        return None
    if not all(all(map(_is_cpu, x)) for x in (*tensors, state_steps)):
        return None
    if not all(all(map(_contiguous, x)) for x in tensors) or set(map(_numel, state_steps)) != {1}:
        return None
    if any(map(_is_neg, grads)) or any(map(_is_neg, params)):
        # A lazily negated tensor (autograd leaves one as the gradient of a real number used as the
        # imaginary part of a conjugated complex one) holds -x in memory: the C loops would read x.
        return None
    shapes = list(map(_shape, params))
    if any(list(map(_shape, x)) != shapes for x in tensors[1:]):
        return None
    table = array("q", map(_ptr, params))
    for x in (*tensors[1:], state_steps):
        table.extend(map(_ptr, x))
    table.extend(map(_numel, params))
    table.extend(codes)
    return table


def _table_per_tensor(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], state_steps: list[Tensor]) -> tuple[list[int], list[list[int]]]:
    """The indices the C loops take and their table rows, one tensor at a time (any layout, DTensors)."""
    n = len(params)
    fast: list[int] = []
    rows: list[list[int]] = [[], [], [], [], [], [], []]
    rp, rg, rm, rv, rs, rn, rc = rows
    dtensor = dtensor_type()
    for i in range(n):
        p, g, m, v, s = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        shape = p.shape
        if g.shape != shape or m.shape != shape or v.shape != shape:
            raise _shape_error(i, p, g, m, v)
        if not (state_holds(p, m) and state_holds(p, v)):
            # Wider state goes to the for-loop kernel (type promotion); narrower would fail half-way.
            raise ValueError(
                f"tensor {i}: exp_avg ({m.dtype}) and exp_avg_sq ({v.dtype}) must have the parameter's dtype "
                f"({p.dtype}) or a wider one"
            )
        if dtensor is not None and isinstance(p, dtensor):
            # A DTensor (FSDP2 shard) has no data pointer of its own: update its local shard, which is
            # right when all four tensors share one layout; otherwise the for-loop kernel takes it.
            local = _local_shards(dtensor, p, g, m, v)
            if local is None:
                continue
            p, g, m, v = local
        if p.is_complex():
            p, g, m, v = (torch.view_as_real(x) for x in (p, g, m, v))
        code = _code(p, g, m, v, s)
        if code is None:
            continue
        ptrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
        s_ptr = s.data_ptr()
        if (p.numel() and 0 in ptrs) or not s_ptr:
            raise _no_memory_error(i)
        fast.append(i)
        rp.append(ptrs[0])
        rg.append(ptrs[1])
        rm.append(ptrs[2])
        rv.append(ptrs[3])
        rs.append(s_ptr)
        rn.append(p.numel())
        rc.append(code)

    return fast, rows
