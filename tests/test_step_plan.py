"""The collection kept from one step to the next (``adoptim/_plan.py``) and every way it can go stale.

A steady loop reuses the lists of the step before, with new gradients. Each test below warms an optimizer
up until it steps from its kept lists, then changes one thing the lists rest on, and checks the next step
against the float64 reference taken from the tensors as they are at that moment: what the parameter, its
gradient and its state hold. A kept list that missed the change would step the old tensor (or none, or
the wrong one), so each test fails if its check is taken out of ``GroupPlan.current`` or ``_Part.current`` (or, for
gradients, out of the fused kernel's ``_KeptTable.takes``). The facts are checked in C where the library
is built (``kernels/facts.py``) and in Python otherwise: every test runs with each.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from optim_helpers import FACTS_CHECKERS, use_facts_checker

import adoptim
from adoptim import _plan, functional
from adoptim.kernels import fused_cpu
from adoptim.kernels.contract import Hyper, KernelPlan
from adoptim.reference import adopt_step

LR, BETAS, EPS, WD = 0.1, (0.9, 0.99), 1e-6, 0.1
KERNELS = [dict(fused=True), dict(foreach=True), dict(foreach=False)]
needs_kernel = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


@pytest.fixture(autouse=True, params=FACTS_CHECKERS)
def facts_checker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the facts checked in one C call, and in Python (where the library is missing)."""
    use_facts_checker(request.param, _plan, monkeypatch)
    return request.param


def _ids(flags: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in flags.items())


def _flat(t: torch.Tensor) -> list[float]:
    return t.detach().double().reshape(-1).tolist()


def _make(n: int = 3, dtype: torch.dtype = torch.float64, **flags: object) -> tuple[list, adoptim.ADOPT]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=dtype)) for _ in range(n)]
    return params, adoptim.ADOPT(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flags)


def _grads(params: list[torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _warm(params: list[torch.Tensor], opt: adoptim.ADOPT, steps: int = 3) -> None:
    """Steps until the optimizer steps from kept lists (checked: the collection pass no longer runs)."""
    for k in range(steps):
        _grads(params, k)
        opt.step()
    calls = []
    real = opt._init_group
    opt._init_group = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        _grads(params, 99)
        opt.step()
    finally:
        del opt._init_group
    assert not calls, "a steady step ran the collection pass: nothing was kept"


def _step_matches_reference(opt: adoptim.ADOPT, params: list[torch.Tensor], rtol: float = 1e-12) -> None:
    """One opt.step(), checked against the reference step from what each tensor holds right before it."""
    want = {}
    for p in params:
        if p.grad is None:
            want[p] = p.detach().clone()
            continue
        st = opt.state.get(p) or {}
        m = st.get("exp_avg", torch.zeros_like(p))
        v = st.get("exp_avg_sq", torch.zeros_like(p))
        step = int(st["step"]) if "step" in st else 0
        rp, rm, rv, _ = adopt_step(_flat(p), _flat(p.grad), _flat(m), _flat(v), step, lr=LR, beta1=BETAS[0],
                                   beta2=BETAS[1], eps=EPS, weight_decay=WD)
        want[p] = (torch.tensor(rp, dtype=torch.float64).reshape(p.shape), rm, rv, step + 1)
    opt.step()
    for p in params:
        if p.grad is None:
            assert torch.equal(p.detach(), want[p])
            continue
        rp, rm, rv, step = want[p]
        st = opt.state[p]
        torch.testing.assert_close(p.detach().double(), rp, rtol=rtol, atol=1e-14)
        torch.testing.assert_close(torch.tensor(_flat(st["exp_avg"])), torch.tensor(rm), rtol=rtol, atol=1e-14)
        torch.testing.assert_close(torch.tensor(_flat(st["exp_avg_sq"])), torch.tensor(rv), rtol=rtol, atol=1e-14)
        assert int(st["step"]) == step


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_steady_steps_from_kept_lists_match_the_reference(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    for k in range(3):
        _grads(params, 10 + k)
        _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_parameter_data_replaced(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    params[1].data = params[1].data + 1.0  # new storage under the same Parameter
    _grads(params, 20)
    _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_parameter_data_replaced_by_a_view_with_other_strides_at_the_same_address(flags: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 3, generator=gen, dtype=torch.float64)) for _ in range(2)]
    opt = adoptim.ADOPT(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flags)
    _warm(params, opt)
    ptr = params[0].data_ptr()
    params[0].data = params[0].data.t()  # same address, transposed layout
    assert params[0].data_ptr() == ptr and not params[0].is_contiguous()
    _grads(params, 21)  # gradients contiguous in the new (logical) layout
    _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_parameter_data_replaced_by_a_shorter_view_at_the_same_address(flags: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64)) for _ in range(2)]
    opt = adoptim.ADOPT(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **flags)
    _warm(params, opt)
    base = params[0].data
    params[0].data = base[:4]  # same address and strides, fewer elements
    tail = base[4:].clone()
    for k, st in ((k, opt.state[params[0]]) for k in ("exp_avg", "exp_avg_sq")):
        st[k] = st[k][:4].clone()  # its state cut to match (a write the check also notices)
    opt.state.writes -= 2  # as if only the parameter had changed
    _grads(params, 23)
    _step_matches_reference(opt, params)
    assert torch.equal(base[4:], tail)  # the elements the parameter no longer holds are left alone


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_parameter_dtype_changed(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    params[0].data = params[0].data.float()  # its float64 state is wider: the for-loop kernel takes it
    _grads(params, 22)
    _step_matches_reference(opt, params, rtol=1e-6)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_param_group_added(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    extra = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    _grads(params + [extra], 23)
    _step_matches_reference(opt, params + [extra])
    assert int(opt.state[extra]["step"]) == 1


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_params_list_changed_in_place(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    new = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    opt.param_groups[0]["params"][1] = new  # same list object, same length
    current = [params[0], new, params[2]]
    _grads(current, 24)
    params[1].grad = torch.ones_like(params[1])  # the replaced parameter must not step
    before = params[1].detach().clone()
    _step_matches_reference(opt, current)
    assert torch.equal(params[1].detach(), before)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("how", ["appended", "list replaced"])
def test_params_list_grown_or_replaced(flags: dict, how: str) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    new = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    if how == "appended":
        opt.param_groups[0]["params"].append(new)
        current = params + [new]
    else:
        opt.param_groups[0]["params"] = [params[0], new, params[2]]
        current = [params[0], new, params[2]]
    _grads(params + [new], 24)
    before = params[1].detach().clone()
    _step_matches_reference(opt, current)
    assert int(opt.state[new]["step"]) == 1
    if how != "appended":
        assert torch.equal(params[1].detach(), before)  # no longer in the group: not stepped


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_gradient_appears_and_disappears(flags: dict) -> None:
    params, opt = _make(**flags)
    params[2].requires_grad_(False)
    for k in range(3):
        _grads(params[:2], k)
        opt.step()
    _warm(params[:2], opt, steps=0)
    _grads(params, 25)  # the frozen parameter gets a gradient: its first call
    _step_matches_reference(opt, params)
    params[0].grad = None  # and another loses its gradient
    _grads(params[1:], 26)
    _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_load_state_dict_replaces_the_state(flags: dict) -> None:
    params, opt = _make(**flags)
    other_params, other = _make(**flags)
    for k in range(5):  # another optimizer's state, five steps in
        _grads(other_params, 40 + k)
        other.step()
    _warm(params, opt)
    opt.load_state_dict(other.state_dict())
    _grads(params, 27)
    _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("how", ["key", "entry", "plain entry then key", "state"])
def test_state_tensor_or_entry_replaced(flags: dict, how: str) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    p = params[1]
    st = opt.state[p]
    m, v, s = st["exp_avg"], st["exp_avg_sq"], st["step"]
    if how == "key":
        st["exp_avg_sq"] = torch.full_like(v, 4.0)
    elif how == "entry":
        opt.state[p] = {"step": s.clone(), "exp_avg": m.clone() + 1, "exp_avg_sq": v.clone() * 2}
    elif how == "plain entry then key":  # an entry set to a plain dict, which then changes (no write count)
        entry = {"step": s, "exp_avg": m, "exp_avg_sq": v}
        opt.state[p] = entry
        _grads(params, 28)
        opt.step()
        _grads(params, 29)
        opt.step()  # kept again, with the plain entry
        entry["exp_avg"] = torch.full_like(m, -0.5)
    else:  # the whole state replaced, as some checkpoint code does (its write count may even coincide)
        new = type(opt.state)({q: dict(opt.state[q]) for q in params[:1] + params[2:]})
        new[p] = {"step": s.clone(), "exp_avg": m.clone() * 0.5, "exp_avg_sq": v.clone() + 1}
        new.writes = opt.state.writes
        opt.state = new
    _grads(params, 30)
    _step_matches_reference(opt, params)


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq", "step"])
def test_state_tensor_data_replaced(flags: dict, name: str) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    t = opt.state[params[0]][name]
    t.data = t.data.clone() + (1.0 if name != "step" else 2.0)  # new storage under the same tensor
    _grads(params, 31)
    _step_matches_reference(opt, params)


@needs_kernel
def test_gradient_of_another_layout_or_dtype_or_negated_is_checked_by_the_fused_kernel() -> None:
    params, opt = _make(fused=True)
    _warm(params, opt)
    gen = torch.Generator().manual_seed(32)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    params[0].grad = g.t()  # the parameter's shape, transposed strides
    _grads(params[1:], 33)
    _step_matches_reference(opt, params)
    _grads(params, 37)
    _step_matches_reference(opt, params)  # plain gradients again: the table is kept again
    base = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    params[0].grad = torch._neg_view(base)  # a lazy negation: memory holds -grad
    assert params[0].grad.is_neg()
    _grads(params[1:], 34)
    _step_matches_reference(opt, params)
    plan = KernelPlan()
    p, g32 = params[0].detach().clone(), torch.randn(4, 3, generator=gen)  # a gradient of another dtype
    lists = [[p], [g32.double()], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.tensor(0.0)]]
    hyper = Hyper(lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.0, decoupled_weight_decay=False,
                  clip_exponent=0.25, maximize=False)
    functional.run_fused_kernel(fused_cpu.fused_cpu_adopt, lists, hyper, plan)
    lists[1] = [g32]
    assert fused_cpu.fused_cpu_adopt(*lists, hyper, plan) == [0]  # refused the table, left to the for-loop
    lists[1] = [g32.double()]
    functional.run_fused_kernel(fused_cpu.fused_cpu_adopt, lists, hyper, plan)  # the table kept again
    lists[1] = [torch.ones(2, 3, dtype=torch.float64)]  # fewer elements (the functional API takes any list)
    with pytest.raises(ValueError, match="must have the same shape"):
        fused_cpu.fused_cpu_adopt(*lists, hyper, plan)


@needs_kernel
def test_gradient_data_of_another_dtype_or_size_after_steady_steps() -> None:
    """The .grad setter refuses a gradient of another dtype or size; replacing its .data does not."""
    params, opt = _make(fused=True)
    _warm(params, opt)
    gen = torch.Generator().manual_seed(38)
    _grads(params, 38)
    params[0].grad.data = torch.randn(4, 3, generator=gen, dtype=torch.float32)
    assert params[0].grad.dtype == torch.float32
    _step_matches_reference(opt, params, rtol=1e-6)  # the for-loop kernel takes it (type promotion)
    _warm(params, opt)
    _grads(params, 39)
    params[1].grad.data = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="must have the same shape"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_sparse_gradient_after_steady_steps_is_refused_by_name(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    before = [p.detach().clone() for p in params]
    _grads(params, 35)
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients \\(param group 0 parameter 2\\)"):
        opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_kept_lists_do_not_keep_gradients_alive(flags: dict) -> None:
    params, opt = _make(**flags)
    _warm(params, opt)
    refs = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_state_dict_and_pickling_hold_plain_dicts() -> None:
    import collections
    import copy
    import io
    import pickle

    params, opt = _make()
    _warm(params, opt)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(type(st) is dict for st in loaded["state"].values())
    assert pickle.loads(pickle.dumps(opt.state)).__class__ is collections.defaultdict
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):  # state copied, and kept again
        clone_params = list(clone.param_groups[0]["params"])
        _warm(clone_params, clone)
        _grads(clone_params, 36)
        _step_matches_reference(clone, clone_params)
