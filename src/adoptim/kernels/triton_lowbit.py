"""The Triton kernel of low-precision state: float32 parameters whose ``m`` and ``v`` are 8-bit codes or bfloat16.

It writes the same parameter bits, codes, scales and bfloat16 values as the torch path
(:func:`~.lowbit.lowbit_adopt`), as the fused CPU kernel (``csrc/lowbit.c``) does:

* every float operation is one IEEE float32 rounding in the torch path's order: division and square root
  correctly rounded (``div_rn``, ``sqrt_rn``; Triton's plain float32 ones are approximations), and the
  launch turns off the contraction of a multiply and an add into a fused multiply-add
  (``enable_fp_fusion=False``), which rounds once where the torch path rounds twice;
* the hyperparameters are the float32 values the torch path multiplies by, rounded on the host from the
  same Python floats; the code search uses the torch path's bucket tables (``quant._bucket_counts``);
* stochastic rounding draws ``hash32(i ^ key)`` with 32-bit unsigned integer operations, as
  :func:`~.quant.uniform`; a block's scale is the largest magnitude found on the bit patterns (NaN as
  the default quiet NaN, as the C kernel).

One launch steps all tensors of one format (and block size and rounding): a table holds one row per
tensor (addresses, element count, the step's first-call flag, clip bound and rounding keys) and each
program takes ``_ROWS`` rows of the state, a row being one 8-bit block (one scale) or ``_BF16_ROW``
bfloat16 elements. The host reads each tensor's step count, as the torch path does, to derive the keys
and the bound; the step counters are then advanced on the device.

Tensors it does not take (not float32, complex, not contiguous, other devices than its parameters',
mixed formats, the square-root format, 8-bit blocks over 4096, shards whose first element is not the
parameter's first, 2**31 elements or more, parameters sharing memory) are returned for the torch path.
Tested on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``) and compiled for sm_80/sm_90.
"""

from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

# Absolute: the tests load this file on its own, under Triton's interpreter.
from adoptim.kernels.common import decay_scale, share_memory
from adoptim.kernels.contract import Hyper, KernelPlan
from adoptim.kernels.lowbit import Stored
from adoptim.kernels.quant import _bucket_counts, stream_key, tables

__all__ = ["triton_lowbit_adopt"]

_ROWS_ELEMENTS = 2048  # elements per program (rows of one block each, at least one row)
_BF16_ROW = 256  # bfloat16 elements per row
_MAX_BLOCK = 4096
_NUM_WARPS = 4
_COLS = 11  # table columns: p, g, m data, v data, m scales, v scales, numel, first call, bound bits, m key, v key


@triton.jit
def _hash32(x):
    # quant.hash32 on uint32 values: the products wrap modulo 2**32, as its masked int64 products do.
    x = x ^ (x >> 16)
    x = x * 0x45D9F3B
    x = x ^ (x >> 16)
    x = x * 0x2C1B3C6D
    return x ^ (x >> 16)


@triton.jit
def _encode_8bit(x, keep, idx, key, map_ptr, cnt_ptr, nxt_ptr, MAP_LEN: tl.constexpr, STOCH: tl.constexpr):
    """Codes and scales of the rows of ``x`` (zero where ``keep`` is false), as quant.quantize_8bit."""
    x = tl.where(keep, x, 0.0)
    mag = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    # tl.max's own reduction: tl.max itself is compiled when Triton is imported, out of the interpreter's
    # reach in a process that set TRITON_INTERPRET later (the tests); the interpreter runs this one in numpy.
    top = tl.reduce(mag, 1, tl.standard._elementwise_max)
    top = tl.where(top > 0x7F800000, 0x7FC00000, top)
    amax = top.to(tl.float32, bitcast=True)
    div = tl.where(amax == 0.0, 1.0, amax)
    s = tl.div_rn(x, div[:, None])
    bucket = (s.to(tl.uint32, bitcast=True) >> 15) & 0x1FFFF
    c = tl.load(cnt_ptr + bucket, mask=keep, other=0)
    bound = tl.load(nxt_ptr + bucket, mask=keep, other=0.0)
    if STOCH:
        lo = c + (bound <= s).to(tl.int32) - 1
        lo = tl.minimum(tl.maximum(lo, 0), MAP_LEN - 2)
        below = tl.load(map_ptr + lo, mask=keep, other=0.0)
        above = tl.load(map_ptr + lo + 1, mask=keep, other=1.0)
        frac = tl.div_rn(s - below, above - below)
        u = (_hash32(idx.to(tl.uint32) ^ key) >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        codes = lo + (u < frac).to(tl.int32)
    else:
        codes = c + (bound < s).to(tl.int32)
    return codes.to(tl.uint8), amax


@triton.jit
def _encode_bf16(x, idx, key, STOCH: tl.constexpr):
    """bfloat16 bit patterns of ``x``, as quant.round_bfloat16 (every NaN as torch's 0xFFFF)."""
    b = x.to(tl.uint32, bitcast=True)
    nearest = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nearest = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0xFFFF, nearest)
    if STOCH:
        cut = (b + (_hash32(idx.to(tl.uint32) ^ key) >> 16)) & 0xFFFF0000
        finite = ((b & 0x7F800000) != 0x7F800000) & ((cut & 0x7F800000) != 0x7F800000)
        out = tl.where(finite, cut >> 16, nearest)
    else:
        out = nearest
    return out.to(tl.uint16)


@triton.jit
def _lowbit_kernel(
    table_ptr, chunks_ptr,
    m_map_ptr, m_cnt_ptr, m_nxt_ptr, v_map_ptr, v_cnt_ptr, v_nxt_ptr,
    lr, beta1, omb1, beta2, omb2, eps, wd, decay,
    EIGHT: tl.constexpr, M_STOCH: tl.constexpr, V_STOCH: tl.constexpr, M_LEN: tl.constexpr,
    V_LEN: tl.constexpr, COUPLED: tl.constexpr, DECOUPLED: tl.constexpr, HAS_CLIP: tl.constexpr,
    MAXIMIZE: tl.constexpr, ROW: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    tid = tl.load(chunks_ptr + 2 * pid)
    row0 = tl.load(chunks_ptr + 2 * pid + 1)
    rec = table_ptr + tid * 11
    p_ptr = tl.load(rec).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(rec + 1).to(tl.pointer_type(tl.float32))
    numel = tl.load(rec + 6)
    first_call = tl.load(rec + 7)
    bound = tl.load(rec + 8).to(tl.int32).to(tl.float32, bitcast=True)
    m_key = tl.load(rec + 9).to(tl.uint32)
    v_key = tl.load(rec + 10).to(tl.uint32)

    rows = row0 + tl.arange(0, ROWS)
    cols = tl.arange(0, WIDTH)
    idx = rows[:, None] * ROW + cols[None, :]
    mask = (cols[None, :] < ROW) & (idx < numel)
    # Vector masks: a scalar one does not combine with a vector one in Triton's interpreter.
    later = mask & (idx * 0 + first_call == 0)
    row_mask = (rows * ROW < numel) & (rows * 0 + first_call == 0)

    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + p * wd
    if EIGHT:
        m_codes_ptr = tl.load(rec + 2).to(tl.pointer_type(tl.uint8))
        v_codes_ptr = tl.load(rec + 3).to(tl.pointer_type(tl.uint8))
        m_scale_ptr = tl.load(rec + 4).to(tl.pointer_type(tl.float32))
        v_scale_ptr = tl.load(rec + 5).to(tl.pointer_type(tl.float32))
        mc = tl.load(m_codes_ptr + idx, mask=later, other=0).to(tl.int32)
        vc = tl.load(v_codes_ptr + idx, mask=later, other=0).to(tl.int32)
        m_scale = tl.load(m_scale_ptr + rows, mask=row_mask, other=0.0)
        v_scale = tl.load(v_scale_ptr + rows, mask=row_mask, other=0.0)
        m = tl.load(m_map_ptr + mc, mask=later, other=0.0) * m_scale[:, None]
        v = tl.load(v_map_ptr + vc, mask=later, other=0.0) * v_scale[:, None]
    else:
        m_bits_ptr = tl.load(rec + 2).to(tl.pointer_type(tl.uint16))
        v_bits_ptr = tl.load(rec + 3).to(tl.pointer_type(tl.uint16))
        mb = tl.load(m_bits_ptr + idx, mask=later, other=0).to(tl.uint32)
        vb = tl.load(v_bits_ptr + idx, mask=later, other=0).to(tl.uint32)
        m = (mb << 16).to(tl.float32, bitcast=True)
        v = (vb << 16).to(tl.float32, bitcast=True)

    if DECOUPLED:
        p = p - p * decay
    # v is v_{t-1}: the normaliser excludes this gradient. Selects keep a NaN as torch.clamp does.
    denom = tl.sqrt_rn(v)
    denom = tl.where(denom < eps, eps, denom)
    n = tl.div_rn(g, denom)
    if HAS_CLIP:
        n = tl.where(n < -bound, -bound, n)
        n = tl.where(n > bound, bound, n)
    m = m * beta1 + n * omb1
    p = p - m * lr
    gg = g * g
    v = tl.where(later, v * beta2 + gg * omb2, gg)  # the first call: v = g*g, nothing else

    tl.store(p_ptr + idx, p, mask=later)
    if EIGHT:
        codes, scale = _encode_8bit(m, mask, idx, m_key, m_map_ptr, m_cnt_ptr, m_nxt_ptr, M_LEN, M_STOCH)
        tl.store(m_codes_ptr + idx, codes, mask=later)
        tl.store(m_scale_ptr + rows, scale, mask=row_mask)
        codes, scale = _encode_8bit(v, mask, idx, v_key, v_map_ptr, v_cnt_ptr, v_nxt_ptr, V_LEN, V_STOCH)
        tl.store(v_codes_ptr + idx, codes, mask=mask)
        tl.store(v_scale_ptr + rows, scale, mask=rows * ROW < numel)
    else:
        tl.store(m_bits_ptr + idx, _encode_bf16(m, idx, m_key, M_STOCH), mask=later)
        tl.store(v_bits_ptr + idx, _encode_bf16(v, idx, v_key, V_STOCH), mask=mask)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (what the torch path multiplies a float32 tensor by)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _f32_bits(x: float) -> int:
    return struct.unpack("i", struct.pack("f", x))[0]


@functools.cache
def _tables(signed: bool, stochastic: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The map, and per bucket the count of boundaries below it and the boundary it is compared with."""
    counts, nxt = _bucket_counts(signed, "table" if stochastic else "mids")
    table = tables(signed)[0]
    return table.to(device), counts.to(torch.int32).to(device), nxt[counts].to(device)


def _kind(p: Tensor, g: Tensor, m: Stored, v: Stored) -> str | None:
    """``"8bit"`` or ``"bfloat16"`` when this kernel takes the tensor, else None."""
    dev = p.device
    if not (type(p) in (Tensor, torch.nn.Parameter) and p.dtype == torch.float32 and p.is_contiguous()
            and type(g) is Tensor and g.dtype == torch.float32 and g.layout == torch.strided and g.is_contiguous()
            and g.device == dev and g.shape == p.shape and p.numel() < 1 << 31
            and not p.is_neg() and not g.is_neg()  # a lazy negation: the memory holds minus the values
            and m.fmt.kind == v.fmt.kind and not m.fmt.sqrt and not v.fmt.sqrt and m.offset == v.offset == 0
            and m.data.is_contiguous() and v.data.is_contiguous() and m.data.device == v.data.device == dev):
        return None
    if m.fmt.kind == "bfloat16":
        return "bfloat16"
    if (m.fmt.kind == "8bit" and m.block_size == v.block_size and m.block_size <= _MAX_BLOCK
            and m.absmax.is_contiguous() and v.absmax.is_contiguous() and m.absmax.device == v.absmax.device == dev):
        return "8bit"
    return None


def triton_lowbit_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Stored],
    exp_avg_sqs: list[Stored],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
) -> list[int]:
    """One step of the tensors this kernel takes (see the module docstring); returns the indices of the rest,
    for the torch path. One launch per (device, format, block size, rounding); ``plan`` is not used."""
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise ValueError("the Triton low-precision kernel takes no grad_scale or found_inf (the dispatcher unscales)")
    if share_memory(params):  # the torch path steps them one after the other, a launch at once
        return list(range(len(params)))
    left: list[int] = []
    launches: dict[tuple, list[tuple[int, ...]]] = {}
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True)):
        kind = _kind(p, g, m, v)
        if kind is None:
            left.append(i)
            continue
        t = int(s.item())
        bound = float(t) ** hyper.clip_exponent if hyper.clip_exponent is not None and t > 0 else 0.0
        m_key = stream_key(m.seed, t, m.stream) if m.fmt.stochastic else 0
        v_key = stream_key(v.seed, t, v.stream) if v.fmt.stochastic else 0
        scales = (m.absmax.data_ptr(), v.absmax.data_ptr()) if kind == "8bit" else (0, 0)
        row = (p.data_ptr(), g.data_ptr(), m.data.data_ptr(), v.data.data_ptr(), *scales, p.numel(), int(t == 0),
               _f32_bits(bound), m_key, v_key)
        key = (p.device, kind, m.block_size if kind == "8bit" else _BF16_ROW, m.fmt.stochastic, v.fmt.stochastic)
        launches.setdefault(key, []).append((i, row))
    for key, items in launches.items():
        _launch(key, [r for _, r in items], hyper)
        torch._foreach_add_([state_steps[i] for i, _ in items], 1)  # as the torch path's step_t += 1
    return left


def _launch(key: tuple, rows: list[tuple[int, ...]], hyper: Hyper) -> None:
    device, kind, row_len, m_sto, v_sto = key
    n_rows = max(1, _ROWS_ELEMENTS // row_len)
    chunks = [(j, r0) for j, row in enumerate(rows) for r0 in range(0, -(-row[6] // row_len), n_rows)]
    if not chunks:
        return  # empty tensors only: their steps still count
    host = torch.tensor([x for r in rows for x in r] + [x for c in chunks for x in c], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    flat = host.to(device, non_blocking=True)
    table, chunk_list = flat[: len(rows) * _COLS], flat[len(rows) * _COLS:]
    m_tabs, v_tabs = _tables(True, m_sto, device), _tables(False, v_sto, device)
    lr, wd = float(hyper.lr), hyper.weight_decay
    coupled, decoupled = wd != 0 and not hyper.decoupled_weight_decay, wd != 0 and hyper.decoupled_weight_decay
    decay = float(decay_scale(hyper.lr, wd, torch.float32)) if decoupled else 0.0
    consts = dict(EIGHT=kind == "8bit", M_STOCH=m_sto, V_STOCH=v_sto, M_LEN=m_tabs[0].numel(), V_LEN=v_tabs[0].numel(),
                  COUPLED=coupled, DECOUPLED=decoupled, HAS_CLIP=hyper.clip_exponent is not None,
                  MAXIMIZE=bool(hyper.maximize), ROW=row_len, WIDTH=triton.next_power_of_2(row_len), ROWS=n_rows)
    # The launch runs on its tensors' device; no fused multiply-adds: the torch path rounds each product.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _lowbit_kernel[(len(chunks),)](
            table, chunk_list, *m_tabs, *v_tabs,
            _f32(lr), _f32(hyper.beta1), _f32(1 - hyper.beta1), _f32(hyper.beta2), _f32(1 - hyper.beta2),
            _f32(hyper.eps), _f32(wd), _f32(decay), **consts, num_warps=_NUM_WARPS, enable_fp_fusion=False,
        )
