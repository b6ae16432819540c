"""The for-loop kernel of low-precision state: ADOPT with ``m`` and ``v`` stored in 8 bits or bfloat16.

Each step dequantizes a parameter's ``m`` and ``v`` to float32, runs ADOPT's arithmetic in float32, one
rounding per operation (so the fused kernel, ``csrc/lowbit.c``, repeats it bit for bit), and stores them
back (:mod:`.quant`). It is the ground truth of the low-precision kernels. It has the kernel contract's
signature, with :class:`Stored` records in place of the ``exp_avgs`` and ``exp_avg_sqs`` tensors: a record
is a view of a parameter's state entry (its codes and scales), written in place.

:class:`StateFormat` says how a moment is stored. The formats :data:`FORMATS` names are the ones the
optimizer's ``state_precision`` option offers; others (nearest rounding of ``v``, ``v`` in the square-root
domain) exist for the measurement that chose them (``benchmarks/low_precision.py``).

:class:`ParamWrite` says how a bfloat16 parameter takes its update when the optimizer's ``param_rounding``
is ``"stochastic"`` or ``"kahan"``: the step is computed in float32 from the parameter (plus its Kahan
compensation) and written back rounded, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import decay_scale
from .contract import Hyper, KernelPlan
from .quant import dequantize_8bit, quantize_8bit, round_bfloat16, stream_key, tables

__all__ = ["FORMATS", "PARAM_STREAM", "MomentFormat", "ParamWrite", "StateFormat", "Stored", "lowbit_adopt",
           "n_blocks"]


@dataclass(frozen=True)
class MomentFormat:
    """How one moment is stored: ``kind`` ``"8bit"``, ``"bfloat16"`` or ``"float32"``; stochastic or
    nearest rounding; ``sqrt``: the square root is stored (``v`` only) and squared when read."""

    kind: str
    stochastic: bool = False
    sqrt: bool = False


@dataclass(frozen=True)
class StateFormat:
    """The storage of ``m`` and ``v`` of one low-precision parameter."""

    m: MomentFormat
    v: MomentFormat

    @property
    def stochastic(self) -> bool:
        return self.m.stochastic or self.v.stochastic


# The ``state_precision`` values and their formats, chosen by measurement (docs/low_precision.md): with
# beta2 = 0.9999, nearest rounding leaves v where it was; stochastic rounding of both moments trains as
# 32-bit state does.
FORMATS = {
    "bfloat16": StateFormat(MomentFormat("bfloat16", stochastic=True), MomentFormat("bfloat16", stochastic=True)),
    "8bit": StateFormat(MomentFormat("8bit", stochastic=True), MomentFormat("8bit", stochastic=True)),
}


def n_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


class Stored:
    """One moment of one parameter in its stored form: ``data`` (codes or bfloat16/float32 values, flat)
    and, for 8-bit codes, ``absmax`` (one float32 scale per block). ``offset``: the index of the first
    element in the numbering of the rounding's random numbers (nonzero for a shard of a parameter)."""

    __slots__ = ("data", "absmax", "fmt", "signed", "block_size", "seed", "stream", "offset")

    def __init__(self, data: Tensor, absmax: Tensor | None, fmt: MomentFormat, *, signed: bool,
                 block_size: int, seed: int, stream: int, offset: int = 0) -> None:
        self.data, self.absmax, self.fmt, self.signed = data, absmax, fmt, signed
        self.block_size, self.seed, self.stream, self.offset = block_size, seed, stream, offset

    @staticmethod
    def empty(numel: int, fmt: MomentFormat, *, signed: bool, block_size: int, seed: int, stream: int,
              device: torch.device) -> Stored:
        """Zeros in ``fmt`` (a zero block's codes are those of 0, its scale 0)."""
        if fmt.kind == "8bit":
            zero = int(torch.bucketize(torch.zeros(()), tables(signed)[1]))
            data = torch.full((numel,), zero, dtype=torch.uint8, device=device)
            absmax = torch.zeros(n_blocks(numel, block_size), dtype=torch.float32, device=device)
        else:
            data, absmax = torch.zeros(numel, dtype=_DTYPES[fmt.kind], device=device), None
        return Stored(data, absmax, fmt, signed=signed, block_size=block_size, seed=seed, stream=stream)

    def load(self) -> Tensor:
        """The moment as a flat float32 tensor."""
        if self.fmt.kind == "8bit":
            x = dequantize_8bit(self.data, self.absmax, self.signed, self.block_size)
        else:
            x = self.data.float()
        return x * x if self.fmt.sqrt else x

    def store_(self, x: Tensor, step: int) -> None:
        """Store the flat float32 ``x`` in place; ``step`` is the parameter's step count before this call's."""
        if self.fmt.sqrt:
            x = x.sqrt()
        key = stream_key(self.seed, step, self.stream) if self.fmt.stochastic else None
        if self.fmt.kind == "8bit":
            codes, absmax = quantize_8bit(x, self.signed, self.block_size, key, self.offset)
            self.data.copy_(codes)
            self.absmax.copy_(absmax)
        elif self.fmt.kind == "bfloat16":
            self.data.copy_(round_bfloat16(x, key, self.offset))
        else:
            self.data.copy_(x)


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# The stream of a parameter's own random numbers (0 and 1 round m and v: :meth:`Stored.store_`).
PARAM_STREAM = 2


class ParamWrite:
    """How one bfloat16 parameter takes its float32 update (``param_rounding``).

    ``"stochastic"``: the new float32 value is rounded to bfloat16 stochastically, with the random numbers
    of ``(seed, step, PARAM_STREAM, element index)`` (:func:`.quant.round_bfloat16`), so the parameter is
    unbiased and moves on average by updates smaller than half its ulp. ``"kahan"``: ``comp`` (bfloat16, of
    the parameter's shape) holds what the last rounding cut off; the parameter is read as ``p + comp`` in
    float32, and after the update ``p = nearest(x)``, ``comp = nearest(x - p)``, so ``p + comp`` follows the
    float32 value to about ``2**-9`` of ``p``'s ulp per step.
    """

    __slots__ = ("mode", "seed", "comp")

    def __init__(self, mode: str, *, seed: int = 0, comp: Tensor | None = None) -> None:
        if mode == "kahan" and comp is None:
            raise ValueError("a Kahan-compensated parameter needs its comp tensor")
        self.mode, self.seed, self.comp = mode, seed, comp

    def load(self, param: Tensor) -> Tensor:
        """The parameter as a flat float32 tensor (with its compensation added)."""
        x = param.reshape(-1).float()
        return x + self.comp.reshape(-1).float() if self.mode == "kahan" else x

    def store_(self, param: Tensor, x: Tensor, step: int) -> None:
        """Write the flat float32 ``x`` into ``param`` (and ``comp``); ``step`` as in :meth:`Stored.store_`."""
        if self.mode == "stochastic":
            param.copy_(round_bfloat16(x, stream_key(self.seed, step, PARAM_STREAM)).view(param.shape))
            return
        p = x.to(torch.bfloat16)
        self.comp.copy_((x - p.float()).to(torch.bfloat16).view(self.comp.shape))
        param.copy_(p.view(param.shape))


def lowbit_adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Stored],
    exp_avg_sqs: list[Stored],
    state_steps: list[Tensor],
    hyper: Hyper,
    plan: KernelPlan | None = None,
    *,
    param_writes: list[ParamWrite | None] | None = None,
) -> tuple[()]:
    """One ADOPT step of parameters whose moments are :class:`Stored` records (the kernel contract of
    :mod:`.contract`); takes every tensor, computes in float32 (``plan`` is not used).

    ``param_writes``: one :class:`ParamWrite` (or ``None``) per parameter; a parameter with one is read as
    float32 and its whole step (decay and update) computed in float32 before it is written back once."""
    if hyper.grad_scale is not None or hyper.found_inf is not None:
        raise ValueError("the low-precision kernel takes no grad_scale or found_inf (the dispatcher unscales)")
    beta1, beta2, lr, eps = hyper.beta1, hyper.beta2, hyper.lr, hyper.eps
    wd, decoupled, clip_exponent = hyper.weight_decay, hyper.decoupled_weight_decay, hyper.clip_exponent
    # Every operation below is one float32 rounding (no lerp or addcmul: torch computes those with fused
    # multiply-adds where the CPU has them), so the fused kernel (csrc/lowbit.c) repeats it bit for bit.
    for i, param in enumerate(params):
        writer = param_writes[i] if param_writes is not None else None
        if writer is not None:
            _rounded_step(param, grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i], hyper, writer)
            continue
        grad = -grads[i] if hyper.maximize else grads[i]
        m_st, v_st, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if torch.is_complex(param):
            grad, param = torch.view_as_real(grad), torch.view_as_real(param)
        if wd != 0 and not decoupled:
            grad = grad + param * wd
        g = grad.reshape(-1).float()
        t = int(step_t.item())
        if t == 0:
            v_st.store_(g * g, t)  # v_0 = g_0^2; no parameter update on the first call
            step_t += 1
            continue
        if wd != 0 and decoupled:
            param.sub_(param * decay_scale(lr, wd, param.dtype))
        m, v = m_st.load(), v_st.load()
        # v is v_{t-1}: it excludes this gradient. The square root in float64, rounded once to float32: the
        # correctly rounded float32 root, which torch's own float32 sqrt is not on every CPU.
        normed = g / torch.clamp(v.double().sqrt().float(), min=eps)
        if clip_exponent is not None:
            bound = float(t) ** clip_exponent
            normed.clamp_(-bound, bound)
        m = m * beta1 + normed * (1 - beta1)
        param.sub_(m.view(param.shape).to(param.dtype) * lr)
        v = v * beta2 + (g * g) * (1 - beta2)
        m_st.store_(m, t)
        v_st.store_(v, t)
        step_t += 1
    return ()


def _rounded_step(param: Tensor, grad: Tensor, m_st: Stored, v_st: Stored, step_t: Tensor, hyper: Hyper,
                  writer: ParamWrite) -> None:
    """:func:`lowbit_adopt`'s step of one bfloat16 parameter, the parameter itself in float32 (read and
    written by ``writer``): the same operations, each one float32 rounding."""
    beta1, beta2, lr, eps, wd = hyper.beta1, hyper.beta2, hyper.lr, hyper.eps, hyper.weight_decay
    x = writer.load(param)
    g = grad.reshape(-1).float()
    if hyper.maximize:
        g = -g
    if wd != 0 and not hyper.decoupled_weight_decay:
        g = g + x * wd
    t = int(step_t.item())
    if t == 0:
        v_st.store_(g * g, t)  # no parameter update on the first call: the parameter is not written
        step_t += 1
        return
    if wd != 0 and hyper.decoupled_weight_decay:
        x = x - x * decay_scale(lr, wd, torch.float32)
    m, v = m_st.load(), v_st.load()
    normed = g / torch.clamp(v.double().sqrt().float(), min=eps)
    if hyper.clip_exponent is not None:
        bound = float(t) ** hyper.clip_exponent
        normed.clamp_(-bound, bound)
    m = m * beta1 + normed * (1 - beta1)
    x = x - m * lr
    v = v * beta2 + (g * g) * (1 - beta2)
    writer.store_(param, x, t)
    m_st.store_(m, t)
    v_st.store_(v, t)
    step_t += 1
