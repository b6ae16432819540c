"""Low-precision storage of the moments: blockwise 8-bit codes and bfloat16, with nearest or stochastic rounding.

Every low-precision tensor is stored flat over the parameter's real elements (a complex parameter as pairs
of reals), so one rule covers every shape:

* ``"8bit"``: one ``uint8`` code per element and one float32 scale per block of ``block_size`` elements
  (the block's largest magnitude, ``absmax``). An element is ``table[code] * absmax``; the table is a
  dynamic map (:func:`dynamic_map`): a few codes per decade for small values, many near the block's
  largest. ``m`` takes the signed table, ``v`` the unsigned one (it is never negative).
* ``"bfloat16"``: one bfloat16 value per element.

Rounding to a code (or to bfloat16) is *nearest* or *stochastic*. Stochastic rounding picks the code just
above with probability equal to the distance from the code just below, over the gap: unbiased, so a
quantity that moves by less than one gap per step (ADOPT's ``v`` with ``beta2 = 0.9999`` moves by about
1e-4 of itself) still moves on average, where nearest rounding would return the same code for ever. Its
random numbers are a counter-based hash of (the parameter's seed, the step, the element's index, the
moment), so every run, every resume and every kernel draws the same numbers: :func:`uniform` is the
definition, written with 32-bit integer operations a C or Triton kernel repeats exactly.

The functions here are the for-loop torch path, the ground truth of the low-precision kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = [
    "MASK32", "dequantize_8bit", "dynamic_map", "hash32", "quantize_8bit", "round_bfloat16", "stream_key",
    "tables", "uniform",
]

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit value times one fits in a signed 64-bit integer (no overflow in
# torch's int64 arithmetic, exactly the unsigned 32-bit product after the mask, in any language).
_MUL1, _MUL2 = 0x45D9F3B, 0x2C1B3C6D


def hash32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer mixing function (xor-shift-multiply, twice) of int64 values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL2) & MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int, stream: int) -> int:
    """The key of one tensor's random numbers at one step: ``stream`` 0 rounds ``m``, 1 rounds ``v``."""
    key = hash32(seed & MASK32)
    key = hash32(key ^ (step & MASK32))
    return hash32(key ^ (stream & MASK32) ^ ((seed >> 32) & MASK32))


def uniform(key: int, n: int, device: torch.device | str = "cpu", offset: int = 0) -> Tensor:
    """``n`` float32 numbers in ``[0, 1)``, element ``i`` a function of ``(key, i)`` alone: the top 24 bits
    of ``hash32((i mod 2**32) ^ key ^ hash32(i >> 32))`` times ``2**-24`` (exact in float32), for the
    indices ``i = offset .. offset + n - 1`` (a shard of a parameter draws its elements' numbers)."""
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    x = (idx & MASK32) ^ key
    if offset + n > 1 << 32:  # hash32(0) is 0: the term changes nothing below 2**32 elements
        x = x ^ hash32(idx >> 32)
    return (hash32(x) >> 8).to(torch.float32) * (2.0 ** -24)


@functools.cache
def tables(signed: bool) -> tuple[Tensor, Tensor]:
    """The map and its midpoints (the boundaries of nearest rounding), both float32, on the CPU."""
    table = dynamic_map(signed)
    mids = ((table[:-1].double() + table[1:].double()) / 2).float()
    return table, mids


def dynamic_map(signed: bool) -> Tensor:
    """The sorted float32 values of the 8-bit codes, in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned).

    Decade ``k`` (values in ``(10**-(k+1), 10**-k]``) holds ``2**(D-1-k)`` values ``10**-k * (0.1 + 0.9*j/n)``,
    ``j = 1..n``: half as many as the decade above. The unsigned map has ``D = 8`` decades (255 values) and
    0; the signed map ``D = 7`` decades on each side (127 values) and 0, 255 codes in all. The top value is
    exactly 1, so a block's largest element is stored exactly.
    """
    decades = 7 if signed else 8
    parts = []
    for k in range(decades):
        n = 2 ** (decades - 1 - k)
        j = torch.arange(1, n + 1, dtype=torch.float64)
        parts.append(10.0 ** -k * (0.1 + 0.9 * j / n))
    pos = torch.cat(parts).sort().values
    zero = torch.zeros(1, dtype=torch.float64)
    values = torch.cat([-pos.flip(0), zero, pos]) if signed else torch.cat([zero, pos])
    return values.float()


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` (flat, float32) as rows of ``block_size``, the last one padded with zeros."""
    n = x.numel()
    pad = (-n) % block_size
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block_size)


@functools.cache
def _bucket_counts(signed: bool, bounds: str) -> tuple[Tensor, Tensor]:
    """A table that finds, for a float32 ``x``, how many of the map's midpoints lie below it (``bounds``
    ``"mids"``: nearest rounding's code) or how many values are at or below it (``"table"``: the code
    just above ``x`` in stochastic rounding, plus one), with one lookup and one comparison.

    ``x`` is sorted into a bucket by the top 17 bits of its float32 pattern (sign, exponent and 8 bits of
    mantissa: a relative width of 2**-8, finer than the map's finest gap, so no bucket holds two of the
    boundaries). ``counts[b]`` counts the boundaries below every value of bucket ``b``, ``nxt`` holds the
    boundaries padded with infinity, and the answer is ``counts[b] + (nxt[counts[b]] < x)`` (``<=`` for
    ``"table"``).
    """
    table, mids = tables(signed)
    values = mids if bounds == "mids" else table
    b = torch.arange(1 << 17, dtype=torch.int64)
    magnitude = b & 0xFFFF
    start = (magnitude << 15).to(torch.int32).view(torch.float32)  # smallest magnitude of the bucket
    end = (((magnitude + 1) << 15).clamp(max=0x7F800000)).to(torch.int32).view(torch.float32)
    negative = b >= (1 << 16)
    counts = torch.where(negative, torch.bucketize(-end, values, right=True), torch.bucketize(start, values))
    inner = torch.where(negative, torch.bucketize(-start, values, right=True), torch.bucketize(end, values))
    finite = magnitude < 0x7F80 if signed else (magnitude < 0x7F80) & ~negative
    if bool(((inner - counts)[finite] > 1).any()):  # would need a finer bucket: a map this module does not make
        raise AssertionError("two map boundaries in one bucket")
    nxt = torch.cat([values, torch.full((1,), float("inf"))])
    return counts, nxt


def _count(x: Tensor, signed: bool, bounds: str) -> Tensor:
    """``torch.bucketize(x, mids)`` (``"mids"``) or ``torch.bucketize(x, table, right=True)`` (``"table"``)
    for float32 ``x`` in ``[-1, 1]``, by :func:`_bucket_counts`' lookup (several times faster)."""
    counts, nxt = (t.to(x.device) for t in _bucket_counts(signed, bounds))
    bucket = (x.view(torch.int32) >> 15) & 0x1FFFF
    c = counts[bucket.long()]
    above = nxt[c] < x if bounds == "mids" else nxt[c] <= x
    return c + above


def quantize_8bit(x: Tensor, signed: bool, block_size: int, key: int | None, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Codes (``uint8``, flat) and block scales (float32) of the flat float32 tensor ``x``.

    ``key`` ``None``: nearest rounding (a value on a midpoint takes the lower code); else stochastic
    rounding with the numbers :func:`uniform` draws from ``key``: the code above ``x`` with probability
    ``(x - below) / (above - below)`` (in float32), where ``below <= x < above`` are neighbours in the map.
    Non-finite values are not defined here (the step that made them has already failed). ``offset``: the
    index of ``x``'s first element in the numbering of the random numbers (:func:`uniform`).
    """
    n = x.numel()
    rows = _blocks(x.float(), block_size)
    absmax = rows.abs().amax(dim=1)
    # An all-zero block divides by 1: its codes are 0's code whatever the rounding.
    scaled = (rows / torch.where(absmax == 0, 1.0, absmax)[:, None]).reshape(-1)[:n]
    if key is None:
        codes = _count(scaled, signed, "mids")
    else:
        table = tables(signed)[0].to(x.device)
        lo = (_count(scaled, signed, "table") - 1).clamp_(0, table.numel() - 2)
        below, above = table[lo], table[lo + 1]
        frac = (scaled - below) / (above - below)
        codes = lo + (uniform(key, n, x.device, offset) < frac)
    return codes.to(torch.uint8), absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool, block_size: int) -> Tensor:
    """The flat float32 values that ``codes`` and ``absmax`` (from :func:`quantize_8bit`) stand for."""
    n = codes.numel()
    table = tables(signed)[0].to(codes.device)
    values = table[codes.long()]
    pad = (-n) % block_size
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return (values.view(-1, block_size) * absmax[:, None]).reshape(-1)[:n]


def round_bfloat16(x: Tensor, key: int | None, offset: int = 0) -> Tensor:
    """``x`` (float32) in bfloat16: nearest-even (``key`` ``None``) or stochastic rounding.

    Stochastic: 16 random bits (the top ones of :func:`uniform`'s 24) are added to the low half of the
    float32 bit pattern, which is then cut off; the magnitude rounds up with probability equal to the cut
    fraction, whatever the sign. Infinities and NaNs are rounded to nearest (the addition could turn a
    large finite value into one, or a NaN into infinity). ``offset`` as in :func:`quantize_8bit`.
    """
    x = x.float()
    if key is None:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    noise = (uniform(key, x.numel(), x.device, offset).view(x.shape) * 65536.0).to(torch.int64)
    cut = ((bits + noise) & ~0xFFFF).to(torch.int32).view(torch.float32)
    finite = torch.isfinite(cut) & torch.isfinite(x)
    return torch.where(finite, cut, x).to(torch.bfloat16)
