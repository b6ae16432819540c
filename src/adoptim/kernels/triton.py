"""The fused CUDA kernel: one Triton launch updates every parameter of a (device, dtype) group.

Multi-tensor layout: a table with one row per tensor (addresses of p, g, m, v and of the step counter,
and the element count) and a list of chunks (tensor index, first element). Each Triton program takes one
chunk (one block of 2048 elements by default), so any number of tensors of any sizes costs one launch,
and every element is read once (p, g, m, v) and written once (p, m, v). A second, tiny launch then adds
one to every step counter. The tables hold addresses only; they are built on the host once per set of
tensors and kept in a small cache, so a steady training loop (and a CUDA graph replaying it) copies
nothing from the host.

The arithmetic is the for-loop kernel's, in float32 (float64 for float64 parameters), rounded once to the
parameter's dtype at the end; the state is kept in the parameter's dtype. The first call of each
parameter (its step counter is 0) is a select inside the kernel, not a host branch, so the same launch
serves parameters on their first and later steps and the kernel never reads a device value on the host.

``grad_scale`` divides the gradients (they are not written back); a nonzero ``found_inf`` masks every
store and the step increment, so a step with an inf or NaN in the gradients changes nothing.

Tested on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``) and on CUDA when present.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

# Absolute: the tests load this file on its own, under Triton's interpreter.
from adoptim.kernels.common import share_memory, state_holds
from adoptim.kernels.contract import FUSED_REAL_DTYPES, Hyper, KernelPlan

__all__ = ["triton_adopt"]

# Elements per block, per chunk (one program each) and warps per program, chosen by measuring on an
# H200 (scripts/gpu_check.sh sweeps them; GPT-2-small layout, graph-replayed): 2048/2048/8 ran at
# 3.76 TB/s, 2048/2048/4 at 3.24, 4096/4096/8 at 2.92, 2048 with 8 blocks per chunk at 3.12.
_BLOCK = 2048
_CHUNK = _BLOCK
_NUM_WARPS = 8
_ROW = 6  # table columns: p, g, m, v, step addresses, numel
_CACHE_SIZE = 32

_TL_DTYPES = {dtype: getattr(tl, str(dtype).removeprefix("torch.")) for dtype in FUSED_REAL_DTYPES}

# Launch plans keyed by the addresses and sizes they hold (a cache, not a switch: a miss rebuilds).
_PLANS: dict[tuple, tuple[list[_Group], list[int]]] = {}
# Gradient copies made for the launch in progress (a gradient of another layout than its parameter).
_KEEP_ALIVE: list[Tensor] = []
# Host buffers read by captured CUDA graphs; kept for the life of the process.
_GRAPH_BUFFERS: list[tuple[Tensor, Tensor]] = []


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    # IEEE (correctly rounded) like torch: Triton's plain float32 sqrt and division are approximations,
    # while float64 ones are always IEEE.
    if F64:
        y = tl.sqrt(x)
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _div(x, y, F64: tl.constexpr):
    if F64:
        z = x / y
    else:
        z = tl.div_rn(x, y)
    return z


@triton.jit
def _hyper(hi, mid, lo, F64: tl.constexpr):
    # A hyperparameter passed as float32 parts (see _f32_triple): exact in float64, its float32 rounding
    # otherwise (what torch uses for a Python scalar in float32 arithmetic).
    if F64:
        x = tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = tl.cast(hi, tl.float32)
    return x


@triton.jit
def _round(x, DTYPE: tl.constexpr, BF16: tl.constexpr):
    if BF16:
        # Round to nearest even in integer arithmetic, as torch does: the GPU's conversion does so too,
        # but Triton's interpreter truncates, and the tests run there. NaN is kept as it is.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(DTYPE)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _adopt_kernel(
    table_ptr,
    chunks_ptr,
    host_steps_ptr,
    lr_ptr,
    lr_hi,
    lr_lo,
    lrwd_hi,
    lrwd_lo,
    omb1_hi, omb1_mid, omb1_lo,  # 1 - beta1
    rest_hi, rest_mid, rest_lo,  # beta1 as 1 - (1 - beta1), the weight of torch.lerp's second form
    b2_hi, b2_mid, b2_lo,  # beta2
    omb2_hi, omb2_mid, omb2_lo,  # 1 - beta2
    wd_hi, wd_mid, wd_lo,  # weight decay
    scale_ptr,
    inf_ptr,
    DTYPE: tl.constexpr,
    BF16: tl.constexpr,
    STEP_DTYPE: tl.constexpr,
    F64: tl.constexpr,
    HOST_STEPS: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    EPS: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    CLIP: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    tid = tl.load(chunks_ptr + 2 * pid)
    start = tl.load(chunks_ptr + 2 * pid + 1)
    row = table_ptr + tid * 6
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    numel = tl.load(row + 5)

    if HOST_STEPS:
        step = tl.load(host_steps_ptr + tid).to(CT)
    else:
        step = tl.load(tl.load(row + 4).to(tl.pointer_type(STEP_DTYPE))).to(CT)
    # t counts real updates (1 at the first one); the first call itself (step 0) only sets v.
    first = step == 0
    t = tl.maximum(step, 1.0)

    one_minus_beta1 = _hyper(omb1_hi, omb1_mid, omb1_lo, F64)
    lerp_rest = _hyper(rest_hi, rest_mid, rest_lo, F64)
    beta2 = _hyper(b2_hi, b2_mid, b2_lo, F64)
    one_minus_beta2 = _hyper(omb2_hi, omb2_mid, omb2_lo, F64)
    wd = _hyper(wd_hi, wd_mid, wd_lo, F64)
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(CT)
        lrwd = lr * wd
    elif F64:
        # Triton passes Python floats as float32: a float64 lr travels as a float32 pair.
        lr = tl.cast(lr_hi, CT) + tl.cast(lr_lo, CT)
        lrwd = tl.cast(lrwd_hi, CT) + tl.cast(lrwd_lo, CT)
    else:
        lr = tl.cast(lr_hi, CT)
        lrwd = tl.cast(lrwd_hi, CT)

    if HAS_CLIP:
        if CLIP == 0.25:  # the default: two correctly rounded square roots beat exp2(log2)
            bound = _sqrt(_sqrt(t, F64), F64)
        elif CLIP == 0.5:
            bound = _sqrt(t, F64)
        else:
            bound = tl.exp2(CLIP * tl.log2(t))

    # found_inf as a vector: a scalar mask does not combine with a vector one in Triton's interpreter.
    lanes = tl.arange(0, BLOCK)
    if HAS_INF:
        keep = tl.load(inf_ptr + lanes * 0) == 0
    else:
        keep = lanes >= 0
    if HAS_SCALE:
        inv_scale = tl.load(scale_ptr).to(CT)

    # eps as a tensor of the compute type: a bare Python float in tl.maximum may become a float32
    # constant (it does in Triton 3.6), which would move a float64 result by 2.5e-9 relative.
    eps = tl.full([BLOCK], 0, CT) + EPS
    end = tl.minimum(numel - start, CHUNK)
    # A fixed trip count (blocks past the end are fully masked): a loop bound read from memory trips
    # older Triton interpreters, and the idle blocks of a short tensor cost no memory traffic.
    for k in range(0, CHUNK // BLOCK):
        offs = start + k * BLOCK + lanes
        mask = offs < start + end
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(CT)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(CT)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(CT)
        if HAS_SCALE:
            g = _div(g, inv_scale, F64)
        if MAXIMIZE:
            g = -g
        if HAS_WD and not DECOUPLED:
            g = g + wd * p

        new_p = p
        if HAS_WD and DECOUPLED:
            new_p = p - lrwd * p
        # v still holds v_{t-1}: the normaliser excludes the current gradient.
        # NaN propagates as through torch.clamp: Triton's maximum and minimum otherwise return the operand
        # that is not NaN, which would turn a NaN gradient into a finite, clipped update.
        n = _div(g, tl.maximum(_sqrt(v, F64), eps, propagate_nan=tl.PropagateNan.ALL), F64)
        if HAS_CLIP:
            n = tl.minimum(tl.maximum(n, -bound, propagate_nan=tl.PropagateNan.ALL), bound,
                           propagate_nan=tl.PropagateNan.ALL)
        # torch.lerp's two forms, so the momentum matches the for-loop kernel's lerp_ exactly (a select:
        # beta1 is a kernel argument, and the form depends on it).
        new_m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (n - m), n - (n - m) * lerp_rest)
        new_p = new_p - lr * new_m
        new_v = v * beta2 + one_minus_beta2 * g * g

        new_p = tl.where(first, p, new_p)
        new_m = tl.where(first, m, new_m)
        new_v = tl.where(first, g * g, new_v)
        store = mask & keep
        tl.store(p_ptr + offs, _round(new_p, DTYPE, BF16), mask=store)
        tl.store(m_ptr + offs, _round(new_m, DTYPE, BF16), mask=store)
        tl.store(v_ptr + offs, _round(new_v, DTYPE, BF16), mask=store)


@triton.jit
def _bump_steps_kernel(table_ptr, n, inf_ptr, STEP_DTYPE: tl.constexpr, HAS_INF: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ptrs = tl.load(table_ptr + offs * 6 + 4, mask=mask, other=0).to(tl.pointer_type(STEP_DTYPE))
    step = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_INF:
        mask = mask & (tl.load(inf_ptr + offs * 0) == 0)
    tl.store(ptrs, step + 1.0, mask=mask)


_ptr = Tensor.data_ptr
_numel = Tensor.numel
_contiguous = Tensor.is_contiguous
_dtype = attrgetter("dtype")
_is_neg = Tensor.is_neg


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape keep their elements in the same order (size-1 strides aside)."""
    return a.stride() == b.stride() or (a.is_contiguous() and b.is_contiguous())


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _f32_pair(x: float) -> tuple[float, float]:
    """``x`` as ``hi + lo`` with both exactly representable in float32 (about 48 bits together)."""
    hi = _f32(x)
    return hi, x - hi


def _f32_triple(x: float) -> tuple[float, float, float]:
    """``x`` as ``hi + mid + lo``, three float32 values whose float64 sum is ``x`` exactly.

    For hyperparameters in [0, 1] (betas, weight decay): each part carries the next 24 bits, so three
    cover a float64's 53, and none underflows float32. Kernel arguments, not compile-time constants, so a
    scheduler that changes beta1 every step (OneCycleLR's ``cycle_momentum``) reuses one compiled kernel.
    """
    hi = _f32(x)
    mid = _f32(x - hi)
    return hi, mid, x - hi - mid


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements (any dimension order, no gaps)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class _Group:
    """One launch: the tensors of one (device, dtype), their address table and chunk list."""

    device: torch.device
    dtype: torch.dtype
    steps: list[Tensor]
    host_steps: bool
    table: Tensor
    chunks: Tensor
    n_chunks: int


def _upload(rows: list[tuple[int, ...]], chunks: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    host = torch.tensor([x for r in rows for x in r] + [x for c in chunks for x in c], dtype=torch.int64)
    if device.type == "cuda":
        # Pinned memory makes the copy asynchronous, and capturable in a CUDA graph.
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Gradients first allocated inside a captured step get their table there: the graph copies it
        # from this pinned buffer at every replay, so the buffer must outlive the graph.
        _GRAPH_BUFFERS.append((host, flat))
    return flat[: len(rows) * _ROW], flat[len(rows) * _ROW:]


def _plan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          state_steps: list[Tensor], capturable: bool) -> tuple[list[_Group], bool, list[int]]:
    """Checks the tensors and builds one group per (device, dtype) of those the kernel takes.

    Returns the groups, whether they may be reused for the same tensors (not when a gradient had to be
    copied to its parameter's layout), and the indices of the tensors the kernel does not take, which the
    for-loop kernel updates in the same call: a gradient of another dtype than the parameter's
    (``grad_dtype``), state of another dtype (float32 state of a parameter cast to float16 after some
    steps) or layout (a model made channels_last after its first step), a parameter that is not dense.
    What no kernel can take (narrower state among it) raises ``ValueError``.
    """
    by_key: dict[tuple, list[int]] = defaultdict(list)
    slow: list[int] = []
    for i, p in enumerate(params):
        g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
        dtype = _real(p).dtype
        if dtype not in _TL_DTYPES:
            names = sorted(str(d) for d in _TL_DTYPES)
            raise ValueError(f"fused ADOPT supports {names} parameters, got {p.dtype} (parameter {i})")
        if g.device != p.device or g.shape != p.shape:
            raise ValueError(
                f"gradient {i} must match its parameter: {g.dtype} {tuple(g.shape)} on {g.device} vs "
                f"{p.dtype} {tuple(p.shape)} on {p.device}"
            )
        for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape or t.device != p.device or not state_holds(p, t):
                raise ValueError(
                    f"{name} of parameter {i} must have its parameter's shape and device, and its dtype or a "
                    f"wider one: {t.dtype} {tuple(t.shape)} on {t.device} vs {p.dtype} {tuple(p.shape)} on {p.device}"
                )
        if state_steps[i].dtype not in (torch.float32, torch.float64) or state_steps[i].numel() != 1:
            raise ValueError(f"state_steps[{i}] must be a one-element float32 or float64 tensor")
        # A lazily negated tensor (autograd leaves one as the gradient of a real number used as the imaginary
        # part of a conjugated complex one) holds -x in memory, which the kernel would read as x.
        if (g.dtype != p.dtype or m.dtype != p.dtype or v.dtype != p.dtype or not _is_dense(p)
                or not _same_layout(m, p) or not _same_layout(v, p)
                or p.is_neg() or g.is_neg() or m.is_neg() or v.is_neg()):
            slow.append(i)
            continue
        by_key[(p.device, dtype)].append(i)

    groups, reusable = [], True
    for (device, dtype), idx in by_key.items():
        steps = [state_steps[i] for i in idx]
        on_host = [t.device.type == "cpu" for t in steps]
        host_steps = device.type != "cpu" and all(on_host)
        if not host_steps and any(t.device != device for t in steps):
            raise ValueError(f"state_steps of the parameters on {device} must be all on {device} or all on the host")
        if capturable and host_steps:
            raise ValueError("capturable=True needs the step counters on the parameters' device, not the host")
        if len({t.dtype for t in steps}) > 1:
            raise ValueError("state_steps of parameters of one device and dtype must share a dtype")
        rows, chunks = [], []
        for j, i in enumerate(idx):
            p = _real(params[i])
            g = _real(grads[i])
            if not _same_layout(g, p):
                g = torch.empty_like(p).copy_(g)  # a copy in the parameter's layout, for this call only
                reusable = False
                _KEEP_ALIVE.append(g)
            s_ptr = 0 if host_steps else steps[j].data_ptr()
            rows.append((p.data_ptr(), g.data_ptr(), _real(exp_avgs[i]).data_ptr(),
                         _real(exp_avg_sqs[i]).data_ptr(), s_ptr, p.numel()))
            chunks.extend((j, start) for start in range(0, p.numel(), _CHUNK))
        table, chunk_list = _upload(rows, chunks, device)
        groups.append(_Group(device, dtype, steps, host_steps, table, chunk_list, len(chunks)))
    return groups, reusable, slow


def _on(device: torch.device, t: Tensor | None, name: str) -> Tensor | None:
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return t if t.device == device else t.to(device)


def triton_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
) -> Sequence[int]:
    """One ADOPT step for every parameter it takes, one Triton launch per (device, dtype) group.

    The kernel contract of :mod:`adoptim.kernels.contract`: returns the indices of the tensors it left
    for the for-loop kernel. Takes AMP's ``grad_scale`` (gradients are divided by it) and ``found_inf``
    (nonzero: nothing changes, steps included). With device step counters and a device or float ``lr``
    it never synchronises with the host, so it can be captured in a CUDA graph. Step counters on the
    host work too (the host then increments them, and reads ``found_inf`` to do so).

    With a ``plan`` (:class:`~adoptim.kernels.contract.KernelPlan`), whose promise covers the parameters
    and state, the launch plan is kept there and looked up by the gradients alone.
    """
    lists = (grads, exp_avgs, exp_avg_sqs, state_steps)
    if any(len(x) != len(params) for x in lists):
        raise ValueError(
            "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got "
            f"{[len(params)] + [len(x) for x in lists]}"
        )
    if not params:
        return ()
    kept = plan.data if plan is not None else None
    key = None
    if plan is not None:
        checked = plan.grads
        # Gradients the caller checked (contiguous, the parameters' dtypes and sizes, none negated) are
        # told apart by their addresses alone.
        grads_key = tuple(checked[1]) if checked is not None and checked[0] == id(grads) else _grads_key(grads)
        key = (grads_key, hyper.capturable)
        if type(kept) is _KeptLaunch and kept.key == key:
            groups, slow = kept.groups, kept.slow
        else:
            plan.data = None
            kept = None
    if kept is None:
        groups, slow, reusable = _cached_plan(params, grads, exp_avgs, exp_avg_sqs, state_steps, hyper.capturable)
        if plan is not None and reusable:
            plan.data = _KeptLaunch(key, groups, slow)
    try:
        for group in groups:
            _launch(group, hyper)
    finally:
        _KEEP_ALIVE.clear()
    return slow


class _KeptLaunch:
    """A launch plan kept in a caller's plan, with the gradients' key it was built for."""

    __slots__ = ("key", "groups", "slow")

    def __init__(self, key: tuple, groups: list[_Group], slow: list[int]) -> None:
        self.key, self.groups, self.slow = key, groups, slow


def _grads_key(grads: list[Tensor]) -> tuple:
    """What a launch plan depends on in the gradients: addresses, sizes, dtypes, layouts, lazy negations."""
    layout = () if all(map(_contiguous, grads)) else tuple(map(Tensor.stride, grads))
    negated = tuple(map(_is_neg, grads)) if any(map(_is_neg, grads)) else ()
    return tuple(map(_ptr, grads)), tuple(map(_numel, grads)), tuple(map(_dtype, grads)), layout, negated


def _cached_plan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 state_steps: list[Tensor], capturable: bool) -> tuple[list[_Group], list[int], bool]:
    """The launch plan, the for-loop kernel's share (see ``_plan``) and whether the plan may be reused,
    from the process-wide cache, built and checked on a miss.

    The plan (checks, grouping, address tables) is reused while the same tensors come back. Its key holds
    everything the plan depends on: every address, size and dtype (of parameters, gradients, state and
    step counters), the layouts and any lazy negations. So a tensor that changed under the same Python object
    (``t.data = ...``) or memory reused by another tensor never meets a stale table. Each part is one
    ``map`` in C; about a microsecond per tensor in all.
    """
    tensors = (params, grads, exp_avgs, exp_avg_sqs)
    param_ptrs = tuple(map(_ptr, params))
    numels = tuple(map(_numel, params))
    contiguous = all(all(map(_contiguous, x)) for x in tensors)
    layout = () if contiguous else tuple(tuple(map(Tensor.stride, x)) for x in tensors)
    # Which tensors are lazily negated, when any are: memory just freed by a plain gradient may come back
    # as a negated one at the same address, which must not meet the plain one's plan.
    negated = ()
    if any(map(_is_neg, grads)) or any(map(_is_neg, params)):
        negated = tuple(tuple(map(_is_neg, x)) for x in tensors)
    key = (param_ptrs, *(tuple(map(_ptr, x)) for x in (grads, exp_avgs, exp_avg_sqs, state_steps)), numels,
           *(tuple(map(_numel, x)) for x in tensors[1:]), *(tuple(map(_dtype, x)) for x in (*tensors, state_steps)),
           layout, negated, state_steps[0].device, capturable)
    plan = _PLANS.get(key)
    if plan is not None:
        return (*plan, True)
    if share_memory(params):
        # Parameters that share memory (one listed twice, views of one buffer) go to the for-loop
        # kernel with the whole call: the programs of one launch would update them at once, the
        # for-loop kernel one after the other. The key holds what decides it (addresses, sizes,
        # dtypes, layouts), so the check runs on a miss only.
        groups, reusable, slow = [], True, list(range(len(params)))
    else:
        groups, reusable, slow = _plan(params, grads, exp_avgs, exp_avg_sqs, state_steps, capturable)
    if reusable:
        if len(_PLANS) >= _CACHE_SIZE:
            del _PLANS[next(iter(_PLANS))]  # the oldest
        _PLANS[key] = groups, slow
    return groups, slow, reusable


def _launch(group: _Group, hyper: Hyper) -> None:
    device, dtype, s = group.device, group.dtype, group.steps
    lr, beta1, beta2 = hyper.lr, hyper.beta1, hyper.beta2
    weight_decay, clip_exponent = hyper.weight_decay, hyper.clip_exponent
    grad_scale, found_inf = hyper.grad_scale, hyper.found_inf
    scale = _on(device, grad_scale, "grad_scale")
    inf = _on(device, found_inf, "found_inf")
    if isinstance(lr, Tensor) and lr.device.type == "cpu" and device.type != "cpu":
        lr = float(lr)  # a host tensor is read without a device synchronisation
    lr_tensor = _on(device, lr, "lr") if isinstance(lr, Tensor) else None
    lr_f = 0.0 if lr_tensor is not None else float(lr)
    lr_hi, lr_lo = _f32_pair(lr_f)
    lrwd_hi, lrwd_lo = _f32_pair(lr_f * weight_decay)
    step_values = None
    if group.host_steps:
        host = torch.tensor([float(t) for t in s], dtype=torch.float64)
        step_values = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    dummy = group.table  # any tensor on the device stands in for an absent pointer argument
    if group.n_chunks:
        _adopt_kernel[(group.n_chunks,)](
            group.table, group.chunks, dummy if step_values is None else step_values,
            dummy if lr_tensor is None else lr_tensor, lr_hi, lr_lo, lrwd_hi, lrwd_lo,
            *_f32_triple(1.0 - beta1), *_f32_triple(1.0 - (1.0 - beta1)), *_f32_triple(float(beta2)),
            *_f32_triple(1.0 - beta2), *_f32_triple(float(weight_decay)),
            dummy if scale is None else scale, dummy if inf is None else inf,
            DTYPE=_TL_DTYPES[dtype], BF16=dtype == torch.bfloat16, STEP_DTYPE=_TL_DTYPES[s[0].dtype],
            F64=dtype == torch.float64, HOST_STEPS=group.host_steps, LR_TENSOR=lr_tensor is not None,
            HAS_SCALE=scale is not None, HAS_INF=inf is not None,
            EPS=float(hyper.eps), HAS_WD=weight_decay != 0, DECOUPLED=bool(hyper.decoupled_weight_decay),
            HAS_CLIP=clip_exponent is not None,
            CLIP=0.0 if clip_exponent is None else float(clip_exponent), MAXIMIZE=bool(hyper.maximize),
            BLOCK=_BLOCK, CHUNK=_CHUNK, num_warps=_NUM_WARPS,
        )
    if group.host_steps:
        # The host counters need the host to know found_inf: one read (a synchronisation) with AMP.
        if inf is None or not bool(inf.item()):
            torch._foreach_add_(s, 1)
        return
    _bump_steps_kernel[(triton.cdiv(len(s), 256),)](
        group.table, len(s), dummy if inf is None else inf, STEP_DTYPE=_TL_DTYPES[s[0].dtype],
        HAS_INF=inf is not None, BLOCK=256,
    )
