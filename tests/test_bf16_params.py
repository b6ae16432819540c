"""bfloat16 parameters without float32 master weights (``param_rounding``): stochastic rounding against the
float64 reference with the hash's bits modelled, Kahan compensation against the float32 trajectory within a
closed-form bound, resume through state_dict bit for bit, the default unchanged, and bad input."""

from __future__ import annotations

import io

import pytest
import torch

from adoptim import ADOPT, adopt
from adoptim.kernels.contract import Hyper
from adoptim.kernels.lowbit import PARAM_STREAM
from adoptim.kernels.quant import stream_key, uniform
from adoptim.kernels.single_tensor import single_tensor_adopt
from adoptim.reference import adopt_step

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, decoupled_weight_decay=False,
             clip_exponent=0.25, maximize=False)


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 values just toward zero (or equal) and just away from zero of float64 ``x``, exactly."""
    mant, exp = torch.frexp(x.abs())
    ulp = torch.ldexp(torch.ones_like(x), exp - 8)  # 8 significant bits: |x| = mant * 2**exp, mant in [0.5, 1)
    lo = torch.floor(x.abs() / ulp) * ulp
    return torch.copysign(lo, x), torch.copysign(lo + ulp, x)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """bfloat16's ulp at float64 magnitudes ``x``."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs())[1] - 8)


def _ref_kw(hyper: dict) -> dict:
    return {k: hyper[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay",
                                  "clip_exponent", "maximize")}


@pytest.mark.parametrize("wd, decoupled, maximize", [(0.0, False, False), (0.1, False, True), (0.1, True, False)])
def test_stochastic_rounding_is_the_reference_step_rounded_by_the_hash(wd, decoupled, maximize):
    # Each step starts from the kernel's own state (so nothing propagates): the float64 reference gives the
    # exact new value, and the hash's number for (seed, step, stream 2, index) says which bfloat16
    # neighbour it rounds to: the one away from zero when floor(u * 2**16) / 2**16 >= 1 - the fraction.
    hyper = {**HYPER, "weight_decay": wd, "decoupled_weight_decay": decoupled, "maximize": maximize}
    gen = torch.Generator().manual_seed(0)
    n, seed = 3000, 12345
    p = torch.randn(n, generator=gen).bfloat16()
    m, v, s = torch.zeros(n), torch.zeros(n), torch.zeros(())
    near_total = 0
    for t in range(6):
        g = torch.randn(n, generator=gen).bfloat16()
        before = p.clone()
        ref_p, ref_m, ref_v, _ = adopt_step(p.double().tolist(), g.double().tolist(), m.double().tolist(),
                                            v.double().tolist(), t, **_ref_kw(hyper))
        adopt([p], [g], [m], [v], [s], foreach=False, fused=False, param_rounding="stochastic",
              rounding_seeds=[seed], **hyper)
        assert s.item() == t + 1
        torch.testing.assert_close(m.double(), torch.tensor(ref_m, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v.double(), torch.tensor(ref_v, dtype=torch.float64), rtol=1e-5, atol=1e-9)
        if t == 0:
            assert torch.equal(p, before)  # the first call sets v only
            continue
        x = torch.tensor(ref_p, dtype=torch.float64)
        lo, hi = _bf16_neighbours(x)
        frac = (x - lo) / (hi - lo)
        noise = torch.floor(uniform(stream_key(seed, t, PARAM_STREAM), n).double() * 65536) / 65536
        expected = torch.where(noise >= 1 - frac, hi, lo)
        # Where the threshold is within 2**-12 of a gap, float32's few roundings (2**-16 of a gap each)
        # may decide otherwise: either neighbour is right there, and such cases are rare.
        near = (noise - (1 - frac)).abs() < 2.0 ** -12
        got = p.double()
        assert bool(((got == lo) | (got == hi)).all())
        assert torch.equal(got[~near], expected[~near])
        near_total += int(near.sum())
        # the rounding moved many elements by a whole ulp where nearest rounding would not have
        assert int((got != x.float().bfloat16().double()).sum()) > n // 20
    assert near_total < 5 * n * 0.01


def _kahan_run(mode: str, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, the float64 reference after ``steps``, p + comp of the run), on gradients that do not depend on
    the parameter, so the float64 trajectory is the one a float32 parameter would follow."""
    hyper = {**HYPER, "lr": lr, "beta2": 0.99}
    gen = torch.Generator().manual_seed(1)
    n = 2000
    p = (torch.randn(n, generator=gen) * 2).bfloat16()
    x0 = p.double()
    m, v, s = torch.zeros(n), torch.zeros(n), torch.zeros(())
    comp = torch.zeros(n, dtype=torch.bfloat16)
    ref = (x0.tolist(), [0.0] * n, [0.0] * n)
    for t in range(steps + 1):
        g = torch.randn(n, generator=gen).bfloat16()
        rp, rm, rv, _ = adopt_step(ref[0], g.double().tolist(), ref[1], ref[2], t, **_ref_kw(hyper))
        ref = (rp, rm, rv)
        if mode == "kahan":
            adopt([p], [g], [m], [v], [s], foreach=False, fused=False, param_rounding="kahan", kahan_comps=[comp],
                  **hyper)
        else:  # today's bfloat16 step, in the parameter's arithmetic
            mb, vb = (x.bfloat16() for x in (m, v))
            single_tensor_adopt([p], [g], [mb], [vb], [s], Hyper(**hyper))
            m, v = mb.float(), vb.float()
    return x0, torch.tensor(ref[0], dtype=torch.float64), p.double() + comp.double()


def test_kahan_tracks_the_float32_trajectory_within_the_bound():
    # Per step p + comp is split from the float32 value x as p = nearest(x), comp = nearest(x - p): the
    # error is at most half comp's ulp, and |comp| <= ulp(p)/2 gives 2**-9 ulp(p); reading p + comp and
    # x - lr*m in float32 adds at most 2**-16 ulp(p) each. So after T steps the distance to the exact
    # trajectory is at most T * (2**-9 + 2**-15) ulp(max |p|). The moments are float32 (the reference's
    # float64 ones differ by 1e-7 of the update: nothing at this scale).
    steps, lr = 60, 2e-4
    x0, ref, tracked = _kahan_run("kahan", steps, lr)
    clip = (steps + 1) ** 0.25  # |m| never exceeds the clip bound
    reach = x0.abs() + steps * lr * clip
    bound = steps * (2.0 ** -9 + 2.0 ** -15) * _ulp(reach)
    err = (tracked - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # The same run in the parameter's own arithmetic loses the updates under half an ulp (most here).
    _, ref_n, plain = _kahan_run("nearest", steps, lr)
    assert torch.equal(ref_n, ref)
    assert float((plain - ref).abs().median()) > 10 * float(err.median())


def _model(dtype: torch.dtype = torch.bfloat16) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=gen).to(dtype)),  # 5120: low-precision state
            torch.nn.Parameter(torch.randn(80, generator=gen).to(dtype)),      # small: full state
            torch.nn.Parameter(torch.randn(16, generator=gen))]                # float32: as without the option


def _grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _run(params: list[torch.Tensor], opt: ADOPT, start: int, stop: int) -> None:
    for step in range(start, stop):
        _grads(params, step)
        opt.step()


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
@pytest.mark.parametrize("precision", ["full", "bfloat16", "8bit"])
def test_resume_through_state_dict_is_bit_identical(mode, precision):
    kw = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True, param_rounding=mode, state_precision=precision)
    ref = _model()
    opt = ADOPT(ref, **kw)
    _run(ref, opt, 0, 6)
    again = _model()
    opt2 = ADOPT(again, **kw)
    _run(again, opt2, 0, 3)
    buf = io.BytesIO()
    torch.save(opt2.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    key = "kahan_comp" if mode == "kahan" else "param_rounding_seed"
    assert key in saved["state"][0] and key in saved["state"][1] and key not in saved["state"][2]
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in again]
    opt3 = ADOPT(resumed, **kw)
    opt3.load_state_dict(saved)
    _run(resumed, opt3, 3, 6)
    for a, b in zip(ref, resumed, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ref, resumed, strict=True):
        sa, sb = opt.state[a], opt3.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    if mode == "stochastic":
        assert [int(opt.state[p][key]) for p in ref[:2]] == [0, 1]  # the parameters' positions


def test_the_optimizer_steps_as_the_functional_form_with_its_seeds_and_comps():
    for mode in ("stochastic", "kahan"):
        params = _model()[:2]
        opt = ADOPT(params, lr=1e-2, param_rounding=mode, foreach=False, fused=False)
        copies = [p.detach().clone() for p in params]
        ms, vs = [torch.zeros_like(p) for p in copies], [torch.zeros_like(p) for p in copies]
        steps = [torch.zeros(()) for _ in copies]
        comps = [torch.zeros_like(p) for p in copies]
        for step in range(4):
            _grads(params, step)
            opt.step()
            adopt(copies, [p.grad for p in params], ms, vs, steps, lr=1e-2, beta1=0.9, beta2=0.9999, eps=1e-6,
                  weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False,
                  param_rounding=mode, rounding_seeds=[0, 1], kahan_comps=comps)
        for p, c in zip(params, copies, strict=True):
            assert torch.equal(p, c)
        assert not torch.equal(params[0], _model()[0])


@pytest.mark.parametrize("fused", [False, None])
def test_the_default_is_unchanged(fused):
    # No option and param_rounding="nearest" are the same step, with the same three state keys, and the
    # for-loop path's bits are those of the for-loop kernel called directly.
    a, b, c = _model(), _model(), _model()
    opt_a = ADOPT(a, lr=1e-2, fused=fused)
    opt_b = ADOPT(b, lr=1e-2, fused=fused, param_rounding="nearest")
    ms, vs = [torch.zeros_like(p) for p in c], [torch.zeros_like(p) for p in c]
    steps = [torch.zeros(()) for _ in c]
    for step in range(4):
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        opt_b.step()
        if fused is False:
            _grads(c, step)
            with torch.no_grad():
                single_tensor_adopt(list(c), [p.grad for p in c], ms, vs, steps,
                                    Hyper(lr=1e-2, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0,
                                          decoupled_weight_decay=False, clip_exponent=0.25, maximize=False))
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        assert set(opt_a.state[pa]) == {"step", "exp_avg", "exp_avg_sq"}
    if fused is False:
        for pa, pc in zip(a, c, strict=True):
            assert torch.equal(pa, pc)
    assert opt_a.param_groups[0]["param_rounding"] == "nearest"


def test_an_older_state_dict_takes_the_loading_optimizers_option():
    params = _model()
    opt = ADOPT(params, lr=1e-2)
    _run(params, opt, 0, 2)
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        del g["param_rounding"]
    opt2 = ADOPT(params, lr=1e-2, param_rounding="kahan")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["param_rounding"] == "kahan"
    _run(params, opt2, 2, 3)
    assert opt2.state[params[0]]["kahan_comp"].dtype == torch.bfloat16


@pytest.mark.parametrize("kw, match", [
    ({"param_rounding": "round"}, "Invalid param_rounding: 'round'"),
    ({"param_rounding": True}, "Invalid param_rounding: True"),
    ({"param_rounding": "kahan", "fused": True}, "param_rounding: 'kahan' together with fused=True"),
    ({"param_rounding": "stochastic", "foreach": True}, "together with foreach=True"),
    ({"param_rounding": "stochastic", "capturable": True}, "together with capturable=True"),
    ({"param_rounding": "stochastic", "differentiable": True}, "together with differentiable=True"),
    ({"param_rounding": "kahan", "flat": True}, "together with flat=True"),
])
def test_bad_options_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        ADOPT(_model(), **kw)
    opt = ADOPT(_model()[:1])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": _model()[1:2], **kw})


def test_bad_functional_arguments_are_refused_before_anything_changes():
    p, g = torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    m, v, s = torch.zeros(4), torch.ones(4), torch.ones(())
    kw = dict(foreach=False, fused=False, **HYPER)
    with pytest.raises(ValueError, match="needs rounding_seeds, one entry per parameter, got none"):
        adopt([p], [g], [m], [v], [s], param_rounding="stochastic", **kw)
    with pytest.raises(ValueError, match=r"kahan_comps\[0\] must be a bfloat16 tensor of its parameter's shape"):
        adopt([p], [g], [m], [v], [s], param_rounding="kahan", kahan_comps=[torch.zeros(3)], **kw)
    with pytest.raises(ValueError, match=r"rounding_seeds\[0\] must be an integer"):
        adopt([p], [g], [m], [v], [s], param_rounding="stochastic", rounding_seeds=[0.5], **kw)
    with pytest.raises(ValueError, match="Invalid param_rounding: 'up'"):
        adopt([p], [g], [m], [v], [s], param_rounding="up", **kw)
    assert torch.equal(p, torch.ones(4, dtype=torch.bfloat16)) and s.item() == 1 and torch.equal(m, torch.zeros(4))


def test_a_mismatched_kahan_comp_is_refused_at_step_before_anything_changes():
    params = _model()
    opt = ADOPT(params, lr=1e-2, param_rounding="kahan")
    _run(params, opt, 0, 2)
    saved = opt.state_dict()
    saved["state"][1]["kahan_comp"] = torch.zeros(3, dtype=torch.bfloat16)
    opt.load_state_dict(saved)
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    _grads(params, 2)
    with pytest.raises(RuntimeError, match="param group 0 parameter 1 does not match it: its kahan_comp must be "
                                           r"bfloat16 of shape \(80,\)"):
        opt.step()
    for p, b, s in zip(params, before, steps, strict=True):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["step"], s)
