"""Kernels against each other in torch's style: a real model, a layer frozen mid-run, a step with no grads."""

from __future__ import annotations

import copy

import pytest
import torch
from capabilities import FLAG_COMBOS, KERNELS

import adoptim
from adoptim.reference import adopt_step


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


@pytest.mark.parametrize("eager,capturable", [("forloop", "forloop-capturable"), ("foreach", "foreach-capturable")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_capturable_matches_eager_bitwise(eager: str, capturable: str, dtype: torch.dtype) -> None:
    """The capturable form runs the eager form's operations with the same scalars on later calls and
    folds the first call in only through selects and an exact multiplication by 0 or 1, so it gives the
    same bits in every dtype, for every flag set and a tensor lr, with a parameter whose gradients start
    late (a coefficient derived from the step, such as 1 - beta2 * min(step, 1), would be rounded to
    bfloat16, where 0.99 becomes 0.988)."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(50, generator=gen).to(dtype) for _ in range(3)]
    grads = [[torch.randn(50, generator=gen).to(dtype) for _ in range(3)] for _ in range(6)]
    for flags in FLAG_COMBOS:
        for lr in (0.01, torch.tensor(0.01)):
            results = []
            for kernel in (eager, capturable):
                params = [x.clone().requires_grad_() for x in init]
                opt = adoptim.ADOPT(params, lr=lr, **flags, **KERNELS[kernel])
                for t, step_grads in enumerate(grads):
                    for p, g in zip(params, step_grads):
                        p.grad = None if t < 2 and p is params[2] else g  # params[2] starts at step 2
                    opt.step()
                results.append([x for p in params for x in (p.detach(), opt.state[p]["exp_avg"],
                                                             opt.state[p]["exp_avg_sq"], opt.state[p]["step"])])
            where = f"{flags}, lr {lr!r}"
            for a, b in zip(*results):
                assert a.dtype == b.dtype and torch.equal(a, b), where


def test_step_with_no_grads_changes_nothing() -> None:
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert len(opt.state) == 0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_first_call_sets_only_v_even_where_g_over_eps_overflows(kernel: str, dtype: torch.dtype) -> None:
    # With v still 0 on the first call, g / eps (1e6 * g) exceeds float16's range (65504). The capturable
    # forms fold the first call into the arithmetic; they once computed (g / eps) * 0 = inf * 0 = nan
    # into m. The first call must set v = g * g (rounded once) and change nothing else.
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(64, generator=gen).to(dtype)
    grads = [torch.randn(64, generator=gen).to(dtype) for _ in range(3)]
    p = init.clone().requires_grad_()
    opt = adoptim.ADOPT([p], lr=0.01, betas=(0.9, 0.99), eps=1e-6, **KERNELS[kernel])
    p.grad = grads[0]
    opt.step()
    st = opt.state[p]
    assert torch.equal(p.detach(), init) and torch.equal(st["exp_avg"], torch.zeros_like(init))
    assert torch.equal(st["exp_avg_sq"], (grads[0].double() ** 2).to(dtype))
    # Two more calls, each against the float64 reference started from the kernel's stored (rounded) values.
    # The non-fused kernels compute in the parameter's dtype, each stored value a few roundings (sqrt,
    # division, lerp, product, sum: each within half a unit of the dtype's epsilon of its operands' size)
    # away; the fused kernel computes in float32 and rounds once. So the bound is 4 epsilons of the size of
    # the terms each value sums (its magnitude alone would not do: m can be a small difference of terms).
    unit = 4 * torch.finfo(dtype).eps
    for step, g in enumerate(grads[1:], start=1):
        p0, m0, v0 = (x.detach().double() for x in (p, st["exp_avg"], st["exp_avg_sq"]))
        want = adopt_step(p0.tolist(), g.double().tolist(), m0.tolist(), v0.tolist(), step, lr=0.01, beta1=0.9,
                          beta2=0.99, eps=1e-6, clip_exponent=0.25)
        want_p, want_m, want_v = (torch.tensor(x, dtype=torch.float64) for x in want[:3])
        normed = (g.double() / v0.sqrt().clamp(min=1e-6)).clamp(-(step**0.25), step**0.25)
        sizes = (p0.abs() + 0.01 * want_m.abs(), 0.9 * m0.abs() + 0.1 * normed.abs(),
                 0.99 * v0 + 0.01 * g.double() ** 2)
        p.grad = g
        opt.step()
        for name, got, expected, size in zip("pmv", (p.detach(), st["exp_avg"], st["exp_avg_sq"]),
                                             (want_p, want_m, want_v), sizes):
            error = (got.double() - expected).abs()
            assert (error <= unit * size).all(), (name, step, float((error / size).max() / torch.finfo(dtype).eps))


@pytest.mark.parametrize("kernel", sorted(set(KERNELS) - {"forloop"}))
@pytest.mark.parametrize("clip_exponent", [0.25, None])
def test_nan_and_inf_gradients_propagate_as_in_the_forloop_kernel(kernel: str, clip_exponent) -> None:
    # A NaN gradient element must reach m and p as it does through torch.clamp and the reference, not
    # become a finite, clipped update (a max/min that drops NaN would do that); inf, then inf / inf, too.
    # Parameter 0 takes them on its first call, parameter 1 on a later one; then finite gradients.
    bad = torch.tensor([0.5, float("nan"), float("inf"), -0.25], dtype=torch.float64)
    good = torch.tensor([0.5, 0.5, -0.5, 0.25], dtype=torch.float64)
    # Compared after every call: a later inf / inf makes NaN of an element in every kernel, which would
    # hide a kernel that made it NaN too early (an inf gradient on a first call must only set v = inf).
    runs = []
    for flags in (KERNELS["forloop"], KERNELS[kernel]):
        params = [torch.ones(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        opt = adoptim.ADOPT(params, lr=0.05, clip_exponent=clip_exponent, **flags)
        history = []
        for t, grad in enumerate((good, good, bad, good, bad, good)):
            params[0].grad = None if t < 2 else grad  # parameter 0 starts with the bad gradient
            params[1].grad = grad
            opt.step()
            none = torch.zeros(0, dtype=torch.float64)  # no state yet
            history.append([x.clone() for p in params for x in (
                p.detach(), opt.state[p].get("exp_avg", none), opt.state[p].get("exp_avg_sq", none))])
        runs.append(history)
    for t, (want, got) in enumerate(zip(*runs)):
        for a, b in zip(want, got):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (t, a, b)
            finite = a.isfinite()
            torch.testing.assert_close(b[finite], a[finite], rtol=1e-13, atol=1e-15)
    first = runs[1][2]  # parameter 0's first call, with the bad gradient: p and m unchanged, v = g^2
    assert torch.equal(first[0], torch.ones(4, dtype=torch.float64)) and not first[1].any()
    assert first[2][1].isnan() and first[2][2].isinf()
    assert runs[1][-1][0][1].isnan() and runs[1][-1][3][1].isnan()  # NaN reached both parameters


@pytest.mark.parametrize("eager,capturable", [("forloop", "forloop-capturable"), ("foreach", "foreach-capturable")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_capturable_matches_eager_bitwise_with_state_wider_than_its_parameter(eager: str, capturable: str,
                                                                              dtype: torch.dtype) -> None:
    # model.half() after steps in float32 keeps float32 state: normed, its clip bound and the first
    # call's g * g are then in float32 in the eager form, and must be in the capturable form too.
    # Parameter 1 has its first call after the cast.
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(40, generator=gen) for _ in range(2)]
    grads = [[torch.randn(40, generator=gen) for _ in range(2)] for _ in range(6)]
    results = []
    for kernel in (eager, capturable):
        params = [x.clone().requires_grad_() for x in init]
        opt = adoptim.ADOPT(params, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, **KERNELS[kernel])
        for t, step_grads in enumerate(grads):
            if t == 3:
                for p in params:
                    p.data = p.data.to(dtype)
            for p, g in zip(params, step_grads):
                p.grad = None if t < 3 and p is params[1] else g.to(p.dtype)
            opt.step()
        assert opt.state[params[1]]["exp_avg"].dtype == dtype  # created after the cast
        assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
        results.append([x for p in params for x in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_gradients_of_half_precision_parameters_through_grad_dtype(kernel: str, dtype: torch.dtype) -> None:
    # grad_dtype=float32 keeps a bfloat16 model's gradients in float32. The normalised gradient is then
    # float32 and went into lerp_ with the bfloat16 momentum, which refused it at the first update, in
    # every kernel. Now it is rounded into the state's dtype: each update is the reference from the
    # stored values within a few roundings of the dtype (4 of its epsilons of the size of the terms; m sums
    # 0.9 m + 0.1 n with |n| <= 1 and may cancel).
    p = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)).to(dtype))
    p.grad_dtype = torch.float32
    opt = adoptim.ADOPT([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, decoupled_weight_decay=True,
                        **KERNELS[kernel])
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        g = torch.randn(64, generator=gen)
        p.grad = g
        st = opt.state[p]
        before = [x.detach().double().tolist() for x in (p, st["exp_avg"], st["exp_avg_sq"])] if step else None
        opt.step()
        if step == 0:
            assert torch.equal(st["exp_avg_sq"], (g * g).to(dtype))  # v = g^2 in float32, then v's dtype
            continue
        want = adopt_step(before[0], g.double().tolist(), before[1], before[2], step, lr=0.01, beta1=0.9,
                          beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True,
                          clip_exponent=0.25)
        for got, expected in zip((p.detach(), st["exp_avg"], st["exp_avg_sq"]), want[:3]):
            expected = torch.tensor(expected, dtype=torch.float64)
            size = expected.abs() + 0.1 * (got is st["exp_avg"])
            assert ((got.double() - expected).abs() <= 4 * torch.finfo(dtype).eps * size).all(), step
    assert p.dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == dtype
