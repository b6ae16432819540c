"""The fused CPU kernel: a whole ADOPT step over every tensor in one pass over memory.

The arithmetic lives in ``csrc/adopt_cpu.c``, a small C library built at install time and called here
through ctypes on raw data pointers. One call updates all tensors: the elements of all of them are cut
into equal shares, one per torch thread, and each element is read and written once (read p, g, m, v;
write p, m, v). float32 and float64 are computed in their own precision; bfloat16 and float16 are
widened to float32 and rounded once when stored, and their state stays in the parameter's dtype.

Tensors the C loops cannot take (not on the CPU, an unsupported dtype, parameter and state laid out
differently) are updated by the for-loop kernel in the same call. When the library was not built, the
foreach kernel runs instead, after one warning.

The host checks every tensor and builds the C call's table of addresses at every call: the usual case
(plain contiguous CPU tensors) a whole list at a time (``_bulk_table``, each check one ``map`` in C),
anything else one tensor at a time (``_table_per_tensor``). Nothing is cached between calls: a tensor's
storage, dtype or layout can change under the same Python object (``t.data = ...``), and the C loops
write through the addresses, so only a table checked against the tensors as they are now is safe.
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

from .common import dtensor_type, state_holds, without_amp
from .foreach import foreach_adopt
from .single_tensor import single_tensor_adopt

__all__ = ["fused_cpu_adopt", "is_available", "bound_kernel"]

# Parameter dtype -> code of the C loops (complex tensors are viewed as their real dtype first).
_PARAM_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_STEP_CODES = {torch.float32: 0, torch.float64: 1}
SUPPORTED_DTYPES = (*_PARAM_CODES, torch.complex64, torch.complex128)
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
            lib.adopt_cpu_bound.restype = None
            lib.adopt_cpu_bound.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int]
            return lib, ""
        except (OSError, AttributeError) as exc:
            error = f"the compiled library could not be loaded ({exc})"
    return None, error


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` after one warning when the installation could not build it."""
    lib, error = _load()
    if lib is not None:
        return lib
    warnings.warn(
        f"adoptim's fused CPU kernel is unavailable: {error}. The foreach kernel runs instead; "
        "reinstall adoptim with a C compiler present to get the fused kernel.",
        RuntimeWarning,
        stacklevel=4,
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
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
) -> None:
    """One ADOPT step on CPU tensors, in place; the arguments are those of :func:`adoptim.adopt`.

    ``grad_scale``: the gradients are divided by it first (the gradient tensors are left as they are,
    as in the Triton kernel). ``found_inf``: when nonzero the whole call changes nothing, steps
    included. ``capturable`` has no effect on the CPU, where reading a step costs no synchronisation.
    """
    if differentiable:
        raise ValueError("differentiable=True needs the for-loop kernel (foreach=False, fused=False)")
    if not params:
        return
    if found_inf is not None and float(found_inf) != 0.0:
        return
    hyper = dict(
        beta1=beta1, beta2=beta2, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        clip_exponent=clip_exponent, eps=eps, maximize=maximize,
    )
    lib = _library()
    if lib is None:
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
            if not (p.shape == g.shape == m.shape == v.shape):
                raise _shape_error(i, p, g, m, v)
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
        foreach_adopt(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, capturable=capturable,
            differentiable=False, **hyper,
        )
        return

    n = len(params)
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    table = _bulk_table(*lists)
    fast: list[int] | range = range(n)
    if table is None:
        fast, rows = _table_per_tensor(*lists)
        if len(fast) < n:
            _for_loop(sorted(set(range(n)) - set(fast)), lists, grad_scale, lr, capturable, hyper)
        if not fast:
            return
        table = array("q", [x for row in rows for x in row])
    address, _ = table.buffer_info()
    status = lib.adopt_cpu_step(
        len(fast), address, float(lr), beta1, beta2, eps, weight_decay, int(decoupled_weight_decay),
        int(clip_exponent is not None), 0.0 if clip_exponent is None else float(clip_exponent),
        int(maximize), int(grad_scale is not None), 1.0 if grad_scale is None else float(grad_scale),
        torch.get_num_threads(),
    )
    if status == 2:  # only from the whole-list table: the per-tensor one was checked, with no update yet
        raise _no_memory_error(None)
    if status == 1:
        # Two parameters share memory (one listed twice, or views of one buffer): the threads of the C
        # call would update it at once, so the for-loop kernel updates them one after the other.
        _for_loop(fast, lists, grad_scale, lr, capturable, hyper)
    elif status != 0:
        raise MemoryError("the fused CPU kernel could not allocate its bookkeeping; nothing was changed")
    else:
        # The C loops write behind autograd's back: bump the parameters' version counters as an in-place
        # operation does, so a backward through a graph that saved a parameter before this step is refused
        # rather than silently using the new values (about 50 ns a tensor).
        increment_version(params if len(fast) == n else [params[i] for i in fast])


def _for_loop(idx: Sequence[int], lists: tuple[list[Tensor], ...], grad_scale: Tensor | None, lr: float | Tensor,
              capturable: bool, hyper: dict) -> None:
    """The for-loop kernel on the tensors at ``idx`` (``found_inf`` was read already)."""
    without_amp(single_tensor_adopt, ([x[i] for i in idx] for x in lists), grad_scale, None,
                dict(hyper, lr=lr, capturable=capturable, differentiable=False))


_dtype = attrgetter("dtype")
_shape = attrgetter("shape")
_is_cpu = attrgetter("is_cpu")
_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contiguous = Tensor.is_contiguous
_is_neg = Tensor.is_neg


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


def bound_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> None:
    """A STREAM-like kernel with the step's memory traffic, for benchmarks: float32, contiguous, CPU.

    It reads p, g, m and v and writes p, m and v (28 bytes per element) with trivial arithmetic, on
    ``torch.get_num_threads()`` threads as the step does; its time is the memory-bandwidth bound.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused CPU kernel is not built, so its bandwidth bound cannot be measured")
    for x in (p, g, m, v):
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.shape != p.shape:
            raise ValueError("bound_kernel takes four contiguous float32 CPU tensors of one shape")
    ptrs = (x.data_ptr() for x in (p, g, m, v))
    lib.adopt_cpu_bound(*ptrs, p.numel(), torch.get_num_threads())
