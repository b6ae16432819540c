"""``benchmarks/low_precision_speed.py``'s peak-RSS column: a process of its own per contender, whose rise
above the parameters and gradients is the optimizer's state (against the bytes its state tensors hold)."""

from __future__ import annotations

import sys

import pytest
from optim_helpers import benchmark_script

MIB = 1 << 20


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("low_precision_speed") as module:
        yield module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_peak_rss_rise_is_the_state_of_each_storage(bench):
    # Layout (b): 100 tensors of 100,000 float32 elements, all above state_min_size. Full state is m and v
    # in float32 (8 bytes per element); bfloat16 4; 8-bit codes 2 plus a float32 scale per 256 elements.
    numel = 100 * 100_000
    expected = {"ADOPT fused, full state": 8.0, "ADOPT bfloat16 state": 4.0, "ADOPT 8bit state": 2.0 + 8 / 256}
    for name, per_param in expected.items():
        got = bench.peak_rss("b", name, warmup=1, threads=1)
        assert "rss_error" not in got, got
        rise = (got["peak_rss_mb"] - got["base_rss_mb"]) * MIB
        state = numel * per_param
        # The state is allocated once and kept; the steps' own temporaries are a small part on top of it.
        assert state * 0.97 <= rise <= state * 1.25 + 4 * MIB, (name, rise / MIB, state / MIB)
        assert got["base_rss_mb"] * MIB >= 2 * numel * 4  # the parameters and gradients were resident


def test_a_failed_child_is_reported_in_its_cell(bench):
    got = bench.peak_rss("b", "no such optimizer", warmup=1, threads=1)
    assert got["rss_error"].startswith("failed: KeyError")
    assert bench._rss_cell(got) == got["rss_error"]
    assert bench._rss_cell({"peak_rss_mb": 120.4, "base_rss_mb": 100.0}) == "120 (+20)"
    assert bench._rss_cell({}) == "not measured"
