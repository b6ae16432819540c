"""``benchmarks/cold_step.py``: its split of a step (the C kernel call timed inside the same steps, the rest
host work) adds up, every step took the fused kernel, and the table has every row."""

from __future__ import annotations

import pytest
from optim_helpers import benchmark_script

from adoptim.kernels import fused_cpu


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("cold_step") as module:
        yield module


@pytest.mark.skipif(fused_cpu.library() is None, reason="the fused CPU kernel is not built")
def test_the_split_adds_up_and_the_table_has_every_row(bench):
    res = bench.run(tensors=30, elements=64, rounds=3, evict_mb=2)
    times = res["times_ms"]
    assert set(times) == set(bench.ROWS) and all(len(t) == 3 for t in times.values())
    for step, kernel, host in zip(times["ADOPT(fused=True).step()"], times["  its C kernel call"],
                                  times["  the rest: host work"], strict=True):
        assert 0 < kernel < step and host == pytest.approx(step - kernel)
    assert fused_cpu.library() is not None and not isinstance(fused_cpu.library(), bench._TimedKernel)  # put back
    table = bench.cold_step_table(res)
    assert len([line for line in table if line.startswith("| ") and "median" not in line]) == len(bench.ROWS)
    assert "twice the bound leaves" in table[-1]
