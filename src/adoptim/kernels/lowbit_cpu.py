"""The fused CPU step of low-precision state (``csrc/lowbit.c``), called through ctypes on raw data pointers.

It takes float32 parameters on the CPU whose moments are both 8-bit or both bfloat16
:class:`~.lowbit.Stored` records, and writes the same parameter bits, codes, scales and bfloat16 values
as the torch path (:func:`~.lowbit.lowbit_adopt`), whose tables it reads; it returns the indices of the
tensors it left (other dtypes, complex or non-contiguous tensors, other formats, 8-bit blocks over 4096,
shards whose first element is not the parameter's first) for the dispatcher to run on the torch path. The
compiled functions live in the fused CPU kernel's library; an installation built before them lacks them,
and then nothing runs here (:func:`available` is False).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util

import torch
from torch import Tensor

from .common import decay_scale
from .contract import Hyper, KernelPlan
from .lowbit import Stored
from .quant import _bucket_counts, stream_key, tables

__all__ = ["available", "load", "lowbit_cpu_adopt"]

_PER_THREAD = 1 << 15  # elements a thread is worth starting for (the split changes no bit)


class _Hyper(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in (
        "lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "wd", "decay")] + [
        (name, ctypes.c_int) for name in ("coupled", "decoupled", "has_clip", "maximize")]


class _Tensor(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int64), ("step", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("p", "g", "m_data", "v_data", "m_absmax", "v_absmax")] + [
        ("bound", ctypes.c_float), ("m_key", ctypes.c_uint32), ("v_key", ctypes.c_uint32),
        ("first", ctypes.c_int64)]


class _Map(ctypes.Structure):
    _fields_ = [("map", ctypes.c_void_p), ("len", ctypes.c_int64), ("mid_bucket", ctypes.c_void_p),
                ("tab_bucket", ctypes.c_void_p), ("pairs", ctypes.c_void_p)]


def _pack(low: Tensor, high: Tensor) -> Tensor:
    """int64 words of two 32-bit columns (int32 values, or float32 bit patterns), ``low`` in the low half."""
    def bits(x: Tensor) -> Tensor:
        return (x.view(torch.int32) if x.dtype == torch.float32 else x.to(torch.int32)).long() & 0xFFFFFFFF
    return bits(low) | (bits(high) << 32)


@functools.cache
def _packed(signed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """csrc/lowbit.c's tables of a map: per bucket (count, the boundary it is compared with) for nearest
    and stochastic rounding, and per code the pair (map[k], map[k + 1])."""
    table = tables(signed)[0]
    out = []
    for bounds in ("mids", "table"):
        counts, nxt = _bucket_counts(signed, bounds)
        out.append(_pack(counts, nxt[counts]))
    out.append(_pack(table[:-1], table[1:]))
    return out[0], out[1], out[2]


@functools.cache
def _maps() -> tuple[_Map, _Map]:
    """The C view of the signed and unsigned tables (cached tensors: their memory stays)."""
    out = []
    for signed in (True, False):
        table = tables(signed)[0]
        mid, tab, pairs = _packed(signed)
        out.append(_Map(table.data_ptr(), table.numel(), mid.data_ptr(), tab.data_ptr(), pairs.data_ptr()))
    return out[0], out[1]


def load(path: str | None = None) -> ctypes.CDLL | None:
    """The library holding ``adopt_lowbit_step`` (the installed fused CPU library unless ``path``), or None."""
    if path is None:
        spec = importlib.util.find_spec("adoptim.kernels._adopt_cpu")
        if spec is None or not spec.origin:
            return None
        path = spec.origin
    try:
        lib = ctypes.CDLL(path)
        fn = lib.adopt_lowbit_step
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(_Tensor), ctypes.c_int64, ctypes.POINTER(_Hyper),
                   ctypes.POINTER(_Map), ctypes.POINTER(_Map), ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


@functools.cache
def _installed() -> ctypes.CDLL | None:
    return load()


def available() -> bool:
    """Whether the installed library has the fused low-precision steps."""
    return _installed() is not None


def _takes(p: Tensor, g: Tensor, m: Stored, v: Stored) -> str | None:
    """The format of the moments when this kernel takes the tensor (``"8bit"`` or ``"bfloat16"``), else None."""
    if not (type(p) in (Tensor, torch.nn.Parameter) and p.dtype == torch.float32 and p.is_cpu
            and p.is_contiguous() and type(g) is Tensor and g.dtype == torch.float32 and g.layout == torch.strided
            and g.is_cpu and g.is_contiguous() and g.shape == p.shape and not m.fmt.sqrt and not v.fmt.sqrt
            and not p.is_neg() and not g.is_neg()  # a lazy negation: the memory holds minus the values
            and m.fmt.kind == v.fmt.kind and m.data.is_contiguous() and v.data.is_contiguous()
            and m.offset == v.offset == 0):  # a shard's random numbers start elsewhere: the torch path
        return None
    if m.fmt.kind == "bfloat16":
        return "bfloat16"
    if (m.fmt.kind == "8bit" and m.block_size == v.block_size and m.block_size <= _MAX_BLOCK
            and m.absmax.is_contiguous() and v.absmax.is_contiguous()):
        return "8bit"
    return None


_MAX_BLOCK = 4096  # csrc/lowbit.c's MAX_BLOCK


def _overlap(items: list[tuple[int, _Tensor]]) -> bool:
    """Whether any two of the tensors' parameters share memory (4 bytes per element, float32)."""
    spans = sorted((r.p, r.p + 4 * r.n) for _, r in items)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def lowbit_cpu_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Stored],
    exp_avg_sqs: list[Stored],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
    lib: ctypes.CDLL | None = None,
) -> list[int]:
    """One step of the tensors this kernel takes (see the module docstring); returns the indices of the rest.

    ``lib``: the library to call (default the installed one); the dispatcher never passes it. The tensors of
    one format are stepped in one call, their blocks split over torch's threads (``torch.get_num_threads()``).
    """
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise ValueError("the fused low-precision kernel takes no grad_scale or found_inf (the dispatcher unscales)")
    lib = lib or _installed()
    if lib is None:
        return list(range(len(params)))
    signed_map, unsigned_map = _maps()
    lr = hyper.lr
    wd, decoupled = hyper.weight_decay, hyper.decoupled_weight_decay
    decay = 0.0
    if wd != 0 and decoupled:
        decay = float(decay_scale(lr, wd, torch.float32))  # the float32 value the torch path multiplies by
    h = _Hyper(float(lr), hyper.beta1, 1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2, hyper.eps, wd, decay,
               int(wd != 0 and not decoupled), int(wd != 0 and decoupled), int(hyper.clip_exponent is not None),
               int(hyper.maximize))
    left: list[int] = []
    # One call per format (and rounding, and block size): its tensors' blocks share one parallel region.
    calls: dict[tuple, list[tuple[int, _Tensor]]] = {}
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True)):
        kind = _takes(p, g, m, v)
        if kind is None:
            left.append(i)
            continue
        if p.numel() == 0:
            s += 1  # nothing to compute, as on the torch path
            continue
        t = int(s.item())
        bound = float(t) ** hyper.clip_exponent if hyper.clip_exponent is not None else 0.0
        m_key = stream_key(m.seed, t, m.stream) if m.fmt.stochastic else 0
        v_key = stream_key(v.seed, t, v.stream) if v.fmt.stochastic else 0
        absmax = (m.absmax.data_ptr(), v.absmax.data_ptr()) if kind == "8bit" else (None, None)
        rec = _Tensor(p.numel(), t, p.data_ptr(), g.data_ptr(), m.data.data_ptr(), v.data.data_ptr(), *absmax,
                      bound, m_key, v_key, 0)
        key = (8 if kind == "8bit" else 16, m.block_size if kind == "8bit" else 0, m.fmt.stochastic,
               v.fmt.stochastic)
        calls.setdefault(key, []).append((i, rec))
    threads = torch.get_num_threads()
    for (kind_code, block, m_sto, v_sto), items in calls.items():
        recs = (_Tensor * len(items))(*(r for _, r in items))
        numel = sum(r.n for _, r in items)
        # Parameters that share memory step one after another, in order, as on the torch path: one thread.
        nthreads = min(threads, max(1, numel // _PER_THREAD)) if not _overlap(items) else 1
        rc = lib.adopt_lowbit_step(kind_code, len(items), recs, block, ctypes.byref(h), ctypes.byref(signed_map),
                                   ctypes.byref(unsigned_map), int(m_sto), int(v_sto), nthreads)
        if rc != 0:
            left.extend(i for i, _ in items)  # arguments it does not take: nothing of them changed
            continue
        for i, _ in items:
            state_steps[i] += 1
    left.sort()
    return left
