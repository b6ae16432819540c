"""For benchmarks only: a kernel with the fused CPU step's memory traffic, not part of any step.

``benchmarks/step_time.py`` times it as the memory-bandwidth bound of a step over as many elements.
It lives in the compiled library (``csrc/bandwidth.c``) only so that it runs on the threads the step
runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_cpu import library

__all__ = ["bandwidth_bound"]


def bandwidth_bound(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> None:
    """A STREAM-like kernel with the step's memory traffic, for benchmarks: float32, contiguous, CPU.

    It reads p, g, m and v and writes p, m and v (28 bytes per element) with trivial arithmetic, on
    ``torch.get_num_threads()`` threads as the step does; its time is the memory-bandwidth bound.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the fused CPU kernel is not built, so its bandwidth bound cannot be measured")
    for x in (p, g, m, v):
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.shape != p.shape:
            raise ValueError("bandwidth_bound takes four contiguous float32 CPU tensors of one shape")
    lib.adopt_bench_bandwidth_bound(*(x.data_ptr() for x in (p, g, m, v)), p.numel(), torch.get_num_threads())
