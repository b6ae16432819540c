"""The README's migration guide, checked against the installed ports it describes.

Each behavioural claim is measured by running the other package next to adoptim on a probe whose
outcome has a closed form: with beta1 = 0, p0 = 0 and a huge gradient at every update, the update t
moves p by exactly ``-lr * bound(t)``, so the clip bound each port applies can be read off ``p``.
"""

from __future__ import annotations

import pytest
import torch

from adoptim import ADOPT
from adoptim.integrations.pytorch_optimizer import convert_state_dict

LR = 0.1


def clip_bounds(make_opt, updates: int = 3) -> list[float]:
    """The clip bound of each real update, read from the parameter (first call: g = 1; then g = 1e6)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = make_opt([p])
    bounds, last = [], 0.0
    for t in range(updates + 1):
        p.grad = torch.full_like(p, 1.0 if t == 0 else 1e6)
        opt.step()
        if t:
            bounds.append((last - p.item()) / LR)
        last = p.item()
    return bounds


def test_adoptim_clip_bound_is_t_to_the_quarter():
    got = clip_bounds(lambda ps: ADOPT(ps, lr=LR, betas=(0.0, 0.9999)))
    assert got == pytest.approx([1.0, 2**0.25, 3**0.25], rel=1e-12)


def test_torch_adopt_matches_adoptim_bound():
    adopt = pytest.importorskip("adopt")
    got = clip_bounds(lambda ps: adopt.ADOPT(ps, lr=LR, betas=(0.0, 0.9999)))
    assert got == pytest.approx([1.0, 2**0.25, 3**0.25], rel=1e-12)


@pytest.mark.timm
def test_timm_adopt_default_clip_exponent_is_one_third():
    adopt_module = pytest.importorskip("timm.optim.adopt", exc_type=ImportError)
    got = clip_bounds(lambda ps: adopt_module.Adopt(ps, lr=LR, betas=(0.0, 0.9999)))
    assert got == pytest.approx([1.0, 2**0.333, 3**0.333], rel=1e-12)
    # With clip_exp=0.25 it is adoptim's rule.
    got = clip_bounds(lambda ps: adopt_module.Adopt(ps, lr=LR, betas=(0.0, 0.9999), clip_exp=0.25))
    assert got == pytest.approx([1.0, 2**0.25, 3**0.25], rel=1e-12)


def test_pytorch_optimizer_clip_bound_is_one_step_ahead():
    po = pytest.importorskip("pytorch_optimizer")
    for foreach in (False, True):
        got = clip_bounds(lambda ps, f=foreach: po.ADOPT(ps, lr=LR, betas=(0.0, 0.9999), foreach=f))
        assert got == pytest.approx([2**0.25, 3**0.25, 4**0.25], rel=1e-12)


def test_pytorch_optimizer_decays_on_the_first_call_and_edits_grad_in_place():
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = po.ADOPT([p], lr=LR, weight_decay=0.1, weight_decouple=True, foreach=False)
    p.grad = torch.ones_like(p)
    opt.step()  # the first call: ADOPT only sets v, but pytorch_optimizer has already decayed p
    assert torch.equal(p.detach(), torch.full_like(p, 1 - LR * 0.1))
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    coupled = po.ADOPT([q], lr=LR, weight_decay=0.1, foreach=False)
    q.grad = torch.full_like(q, 2.0)
    coupled.step()
    assert torch.equal(q.grad, torch.full_like(q, 2.0 + 0.1))  # the user's gradient was changed


def test_pytorch_optimizer_state_converts_and_loads():
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3))]
    old = po.ADOPT(params, lr=LR, weight_decay=0.01, weight_decouple=True, foreach=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        old.step()
    saved = old.state_dict()
    with pytest.raises(ValueError, match=r"lacks \['step'\] .*pytorch_optimizer\.convert_state_dict"):
        ADOPT(params).load_state_dict(saved)  # its state has no per-parameter step
    new = ADOPT(params)
    new.load_state_dict(convert_state_dict(saved))
    group = new.param_groups[0]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.01 and group["lr"] == LR
    for p in params:
        assert float(new.state[p]["step"]) == 3
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])


def test_convert_refuses_what_adoptim_does_not_implement():
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.nn.Parameter(torch.ones(2))
    sd = po.ADOPT([p], fixed_decay=True).state_dict()
    sd["param_groups"][0].setdefault("step", 0)
    with pytest.raises(ValueError, match="fixed_decay=True"):
        convert_state_dict(sd)
    with pytest.raises(ValueError, match="not a pytorch_optimizer"):
        convert_state_dict(ADOPT([p]).state_dict())


def test_pytorch_optimizer_state_saved_before_its_first_step_converts():
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.nn.Parameter(torch.ones(2))
    sd = convert_state_dict(po.ADOPT([p], lr=0.02, weight_decay=0.1, weight_decouple=True).state_dict())
    new = ADOPT([p], foreach=False)
    new.load_state_dict(sd)
    group = new.param_groups[0]
    assert sd["state"] == {} and group["lr"] == 0.02 and group["decoupled_weight_decay"] is True
    assert group["foreach"] is False  # its foreach=None did not replace the loading optimizer's kernel choice
