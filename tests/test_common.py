"""``kernels.common.share_memory``: which parameter lists a fused kernel must not update in one call."""

from __future__ import annotations

import torch

from adoptim.kernels.common import share_memory


def test_share_memory_finds_every_overlap_and_only_overlaps() -> None:
    buf = torch.zeros(1000)
    grid = torch.zeros(10, 10)
    cases = [
        ([buf, buf], True),  # one tensor listed twice
        ([buf[:500], buf[250:]], True),  # views sharing elements
        ([buf[250:], buf[:500]], True),  # in either order
        ([buf[:500], buf[500:]], False),  # adjacent: the first ends where the second begins
        ([buf[:500], buf[499:]], True),  # one element shared
        ([buf[:0], buf[:0], buf[:10]], False),  # empty tensors may share an address
        ([torch.zeros(3), torch.zeros(3)], False),  # separate allocations
        ([grid[:, 0], grid[:, 1]], True),  # columns interleave: their spans overlap (counted, see docstring)
        ([grid[:5], grid[5:]], False),  # rows 0-4 and 5-9
        ([grid.t(), grid[9:]], True),  # a transposed view spans the whole grid
        ([buf.view(torch.int16)[1:3], buf[1:2]], True),  # bytes, not elements: int16 1-2 are bytes 2-5
        ([buf.view(torch.int16)[:2], buf[1:2]], False),  # int16 0-1 are bytes 0-3, buf[1] bytes 4-7
    ]
    for i, (tensors, expected) in enumerate(cases):
        assert share_memory(tensors) is expected, i
