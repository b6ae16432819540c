"""Every kernel against the float64 reference, for every combination of the algorithm's flags."""

from __future__ import annotations

import pytest
import torch
from capabilities import FLAG_COMBOS, KERNELS
from optim_helpers import hard_grads, hard_params, run_adopt, run_reference

from adoptim.reference import adopt_step

STEPS = 32
BETAS = (0.9, 0.99)


def _ids(c: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=_ids)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_matches_reference(kernel: str, flags: dict, tensor_lr: bool) -> None:
    params = hard_params()
    grads = hard_grads(params, STEPS)
    lr = 0.01
    ps, opt = run_adopt(
        params, grads, lr=torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr, betas=BETAS,
        eps=1e-6, **flags, **KERNELS[kernel],
    )
    ref = run_reference(params, grads, lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=1e-6, **flags)
    # float64 kernels against float64 scalar arithmetic: they differ only in rounding (lerp and fused
    # forms of the same sums), a few ulps a step; 32 steps stay far below 1e-11 relative.
    tol = dict(rtol=1e-11, atol=1e-13)
    for i, (p, want) in enumerate(zip(ps, ref.params())):
        torch.testing.assert_close(p.detach(), want, **tol, msg=f"param {i}")
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], ref.exp_avg(i), **tol, msg=f"exp_avg {i}")
        torch.testing.assert_close(st["exp_avg_sq"], ref.exp_avg_sq(i), **tol, msg=f"exp_avg_sq {i}")
        assert float(st["step"]) == ref.steps()[i]
    assert ref.steps() == [STEPS, STEPS, STEPS - 4, STEPS, STEPS]


def test_reference_closed_form_first_updates() -> None:
    """The reference itself against hand-computed values of the algorithm box."""
    hyper = dict(lr=0.1, beta1=0.9, beta2=0.5, eps=1e-6, clip_exponent=0.25)
    p, m, v, s = adopt_step([1.0], [2.0], [0.0], [0.0], 0, **hyper)
    assert (p, m, v, s) == ([1.0], [0.0], [4.0], 1)  # first call: v = g^2 only
    p, m, v, s = adopt_step(p, [6.0], m, v, s, **hyper)
    # n = 6/sqrt(4) = 3, clipped to 1**0.25 = 1; m = 0.1; p = 1 - 0.01; v = 0.5*4 + 0.5*36 = 20
    assert p == pytest.approx([0.99], abs=1e-15) and m == pytest.approx([0.1]) and v == [20.0] and s == 2
    p, m, v, s = adopt_step(p, [-20.0], m, v, s, **hyper)
    # n = -20/sqrt(20) = -4.47..., clipped to -(2**0.25); m = 0.09 - 0.1*2**0.25
    want_m = 0.9 * 0.1 - 0.1 * 2**0.25
    assert m == pytest.approx([want_m], rel=1e-15) and p == pytest.approx([0.99 - 0.1 * want_m], rel=1e-15)
    unclipped = adopt_step([0.0], [1.0], [0.0], [0.0], 1, **{**hyper, "clip_exponent": None})
    assert unclipped[1] == pytest.approx([0.1 * 1.0 / 1e-6])  # v_0 = 0: divides by eps, no clip


def test_decoupled_decay_and_maximize_closed_form() -> None:
    hyper = dict(lr=0.1, beta1=0.0, beta2=0.5, eps=1e-6, clip_exponent=None)
    p, _, _, _ = adopt_step([2.0], [1.0], [0.0], [1.0], 1, weight_decay=0.5, decoupled_weight_decay=True, **hyper)
    assert p == pytest.approx([2.0 * (1 - 0.05) - 0.1 * 1.0])
    p, _, _, _ = adopt_step([2.0], [1.0], [0.0], [1.0], 1, weight_decay=0.5, **hyper)  # coupled: g = 1 + 1
    assert p == pytest.approx([2.0 - 0.1 * 2.0])
    p, _, _, _ = adopt_step([2.0], [1.0], [0.0], [1.0], 1, maximize=True, **hyper)
    assert p == pytest.approx([2.1])
