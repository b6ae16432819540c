"""The fused kernels' cached launch plans never outlive what they were checked for.

``ADOPT`` keeps one plan per param group and reuses it while the same parameter and state objects come
back at the same addresses. Every event that moves memory without changing any value (new gradient
tensors, a parameter given new storage with ``p.data = ...``, a gradient of another layout, state
replaced by ``load_state_dict``, a parameter without a gradient for a step) must leave the trajectory
equal to the float64 reference's; a stale table would update the wrong memory.
"""

from __future__ import annotations

import copy

import pytest
import torch

import adoptim
from adoptim.kernels import fused_cpu
from adoptim.reference import ReferenceADOPT

HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, clip_exponent=0.25)
REF_HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=False,
                 clip_exponent=0.25, maximize=False)

needs_kernel = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


def _new_storage(opt: adoptim.ADOPT, params: list[torch.Tensor], t: int) -> None:
    params[1].data = params[1].data.clone()  # same values, another address


def _load_copy(opt: adoptim.ADOPT, params: list[torch.Tensor], t: int) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # same values, new state tensors


EVENTS = {
    3: _new_storage,
    5: _load_copy,
}


@needs_kernel
def test_events_that_move_memory_keep_the_reference_trajectory(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64),
            torch.randn(4, 3, generator=gen, dtype=torch.float64)]
    params = [p.clone().requires_grad_(True) for p in init]
    opt = adoptim.ADOPT(params, fused=True, **HYPER)
    ref = ReferenceADOPT(init, **REF_HYPER)
    builds = []
    real = fused_cpu._bulk_table
    monkeypatch.setattr(fused_cpu, "_bulk_table", lambda *a: builds.append(len(a[0])) or real(*a))
    kept = [torch.zeros_like(p) for p in params]  # gradients updated in place: same address every step
    for t in range(10):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        if t == 4:
            grads[2] = None  # a step without this parameter: another list of tensors
        for p, g, k in zip(params, grads, kept):
            if g is None:
                p.grad = None
            elif t in (6, 7):
                p.grad = k.copy_(g)
            elif t == 8 and p.dim() == 2:
                p.grad = g.t().contiguous().t()  # the same values, not contiguous
            else:
                p.grad = g.clone()  # new gradient tensors
        if t in EVENTS:
            EVENTS[t](opt, params, t)
        opt.step()
        ref.step(grads)
        for p, want in zip(params, ref.params()):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.exp_avg(i), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.exp_avg_sq(i), rtol=1e-12, atol=1e-14)
    # Checked tables were built at steps 0, 3 (new storage), 4 (two tensors), 5 (three again, and new
    # state) and 8 (a gradient of another layout, which the whole-list builder leaves to the per-tensor
    # one); every other step, step 9 included, reused the table cached at step 5.
    assert builds == [3, 3, 2, 3, 3]


@needs_kernel
def test_each_param_group_keeps_its_own_plan() -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    params = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    opt = adoptim.ADOPT([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.01}], fused=True,
                        **{k: v for k, v in HYPER.items() if k != "lr"})
    ref_a = ReferenceADOPT([a], **REF_HYPER | dict(lr=1e-3))
    ref_b = ReferenceADOPT([b], **REF_HYPER | dict(lr=0.01))
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref_a.step(grads[:1])
        ref_b.step(grads[1:])
    torch.testing.assert_close(params[0].detach(), ref_a.params()[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params[1].detach(), ref_b.params()[0], rtol=1e-12, atol=1e-14)
    assert set(opt._plan_caches) == {0, 1}
    # The plans are not state: they are neither saved nor copied.
    assert "_plan_caches" not in copy.deepcopy(opt).__dict__ and "_plan_caches" not in str(opt.state_dict())
