"""Kernels against each other in torch's style: a real model, a layer frozen mid-run, a step with no grads."""

from __future__ import annotations

import copy

import pytest
import torch
from capabilities import KERNELS

import adoptim


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


def _train(model: torch.nn.Module, steps: int = 12, **kwargs: object) -> adoptim.ADOPT:
    g = torch.Generator().manual_seed(123)
    opt = adoptim.ADOPT(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, **kwargs)
    dtype = next(model.parameters()).dtype
    for t in range(steps):
        if t == 5:  # freeze the first layer mid-run: its grads become None from now on
            for p in model[0].parameters():
                p.requires_grad_(False)
                p.grad = None
        opt.zero_grad(set_to_none=True)
        if t != 8:  # step 8 has no gradients at all: nothing may change
            x = torch.randn(16, 6, generator=g).to(dtype)
            model(x).pow(2).mean().backward()
        opt.step()
    return opt


PAIRS = [("forloop", "foreach"), ("forloop-capturable", "foreach-capturable")]


@pytest.mark.parametrize("a,b", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_foreach_matches_forloop_bitwise(a: str, b: str, dtype: torch.dtype) -> None:
    m1 = _model().to(dtype)
    m2 = copy.deepcopy(m1)
    o1 = _train(m1, **KERNELS[a])
    o2 = _train(m2, **KERNELS[b])
    # Same operations in the same order on the same CPU: bit-identical, not merely close.
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o1.state[p1][key], o2.state[p2][key], rtol=0, atol=0)
    # The frozen layer took exactly 5 calls (1 initialisation + 4 updates); the rest 11 (one step had no grads).
    assert [float(o1.state[p]["step"]) for p in m1.parameters()] == [5, 5, 11, 11, 11, 11]


def test_capturable_matches_eager_closely() -> None:
    """The arithmetic first-step form differs from the branching one only in rounding."""
    m1 = _model().double()
    m2 = copy.deepcopy(m1)
    _train(m1, foreach=False)
    _train(m2, foreach=False, capturable=True)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-13, atol=1e-15)


def test_step_with_no_grads_changes_nothing() -> None:
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert len(opt.state) == 0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
