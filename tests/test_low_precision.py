"""Low-precision state (``state_precision``): the quantizers against closed-form expectations, one step
against the float64 reference within the quantization error, resume bit-exactness, state_dict round
trips and conversions, and bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

from adoptim import ADOPT
from adoptim import low_precision as LP
from adoptim.kernels.contract import Hyper
from adoptim.kernels.lowbit import FORMATS, Stored, lowbit_adopt
from adoptim.kernels.quant import (
    _count,
    dynamic_map,
    quantize_8bit,
    round_bfloat16,
    stream_key,
    tables,
    uniform,
)
from adoptim.reference import adopt_step

HYPER = dict(lr=0.1, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0, decoupled_weight_decay=False,
             clip_exponent=0.25, maximize=False)


def _values(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, block: int) -> torch.Tensor:
    """What codes stand for, in float64, from the map alone (not the kernel's dequantizer)."""
    table = dynamic_map(signed).double()
    scales = absmax.double().repeat_interleave(block)[: codes.numel()]
    return table[codes.long()] * scales


def _neighbours(y: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The map values just at-or-below and just above ``y`` (float64, in [-1, 1])."""
    table = dynamic_map(signed).double()
    lo = (torch.searchsorted(table, y, right=True) - 1).clamp(0, table.numel() - 2)
    return table[lo], table[lo + 1]


# ----------------------------------------------------------------------------- the quantizers
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed: bool) -> None:
    table = dynamic_map(signed)
    assert table.numel() == (255 if signed else 256)
    assert bool((table[1:] > table[:-1]).all())
    assert table[-1].item() == 1.0 and (0.0 in table.tolist())
    if signed:
        assert torch.equal(table, -table.flip(0))
    # the top decade's gap, relative to the value: 0.9/64 (signed) or 0.9/128 at 1, ten times that at 0.1
    top = table[table > 0.1]
    assert top.numel() == (64 if signed else 128)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bounds", ["mids", "table"])
def test_bucket_lookup_is_bucketize(signed: bool, bounds: str) -> None:
    table, mids = tables(signed)
    values = mids if bounds == "mids" else table
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(100_000, generator=gen) ** 6, table, mids, torch.tensor([0.0, 1.0, 1e-30, 1e-41])])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(2.0)), torch.nextafter(x, torch.tensor(-2.0))])
    x = torch.cat([x, -x]).clamp(-1.0 if signed else 0.0, 1.0)
    expect = torch.bucketize(x, values, right=bounds == "table")
    assert torch.equal(_count(x, signed, bounds), expect)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_rounding_takes_the_nearest_code(signed: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * torch.logspace(-4, 1, 5000)
    x = x if signed else x.abs()
    codes, absmax = quantize_8bit(x, signed, 256, None)
    assert codes.dtype == torch.uint8 and absmax.shape == (math.ceil(5000 / 256),)
    rows = torch.nn.functional.pad(x, (0, 5120 - 5000)).view(-1, 256)
    assert torch.equal(absmax, rows.abs().amax(1))
    got = _values(codes, absmax, signed, 256)
    table = dynamic_map(signed).double()
    scales = absmax.double().repeat_interleave(256)[:5000]
    best = ((x.double()[:, None] / scales[:, None] - table[None, :]).abs()).min(1).values * scales
    err = (got - x.double()).abs()
    assert bool((err <= best * (1 + 1e-6) + 1e-12 * scales).all())


def test_stochastic_rounding_is_a_neighbour_and_unbiased() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(512, generator=gen)
    x[0] = 1.0  # the block's largest: both blocks have absmax 1 after this
    x[256] = 1.0
    lo, hi = _neighbours(x.double(), False)
    draws = 400
    total = torch.zeros(512, dtype=torch.float64)
    for step in range(draws):
        codes, absmax = quantize_8bit(x, False, 256, stream_key(7, step, 1))
        assert torch.equal(absmax, torch.ones(2))
        got = _values(codes, absmax, False, 256)
        assert bool(((got == lo) | (got == hi)).all())
        total += got
    # Bernoulli draws between lo and hi: the mean's standard deviation is at most (hi - lo) / (2 sqrt(draws))
    assert bool(((total / draws - x.double()).abs() <= 5 * (hi - lo) / (2 * math.sqrt(draws)) + 1e-7).all())


def test_bfloat16_rounding() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=gen) * 10.0
    assert torch.equal(round_bfloat16(x, None), x.to(torch.bfloat16))
    down = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).double()  # magnitude cut
    up = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32).double()
    total = torch.zeros(4096, dtype=torch.float64)
    draws = 200
    for step in range(draws):
        got = round_bfloat16(x, stream_key(1, step, 0)).double()
        assert bool(((got == down) | (got == up)).all())
        total += got
    assert bool(((total / draws - x.double()).abs() <= 5 * (up - down).abs() / (2 * math.sqrt(draws))).all())


def test_uniform_is_a_function_of_key_and_index() -> None:
    u = uniform(stream_key(5, 10, 0), 10_000)
    assert torch.equal(u[:100], uniform(stream_key(5, 10, 0), 100))
    assert not torch.equal(u, uniform(stream_key(5, 11, 0), 10_000))
    assert not torch.equal(u, uniform(stream_key(6, 10, 0), 10_000))
    assert not torch.equal(u, uniform(stream_key(5, 10, 1), 10_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - math.sqrt(1 / 12)) < 0.01
    assert torch.equal(u * 2**24, (u * 2**24).round())  # 24-bit numbers


# ----------------------------------------------------------------------------- one step vs the reference
@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
@pytest.mark.parametrize("step", [0, 1, 7])
def test_one_step_against_reference(kind: str, step: int) -> None:
    """From any stored state, p moves as the float64 reference moves from the dequantized state, and the
    stored m and v are within a rounding of the reference's (neighbouring codes, or a bfloat16 ulp)."""
    gen = torch.Generator().manual_seed(10 + step)
    n, block = 1000, 256
    p = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen) * torch.logspace(-3, 0, n)
    fmt = FORMATS[kind]
    m_st = Stored.empty(n, fmt.m, signed=True, block_size=block, seed=3, stream=0, device=torch.device("cpu"))
    v_st = Stored.empty(n, fmt.v, signed=False, block_size=block, seed=3, stream=1, device=torch.device("cpu"))
    if step:
        m_st.store_(torch.randn(n, generator=gen) * 0.3, 0)
        v_st.store_(torch.rand(n, generator=gen) * torch.logspace(-6, 0, n), 0)
    m0, v0 = m_st.load().double(), v_st.load().double()
    p_ref, m_ref, v_ref, _ = adopt_step(p.double().tolist(), g.double().tolist(), m0.tolist(), v0.tolist(), step,
                                        **HYPER)
    p_ref, m_ref, v_ref = (torch.tensor(x, dtype=torch.float64) for x in (p_ref, m_ref, v_ref))
    p_new, s = p.clone(), torch.tensor(float(step))
    lowbit_adopt([p_new], [g], [m_st], [v_st], [s], Hyper(**HYPER))
    assert s.item() == step + 1
    torch.testing.assert_close(p_new.double(), p_ref, rtol=2e-6, atol=1e-7)
    for st, ref, signed in ((m_st, m_ref, True), (v_st, v_ref, False)):
        if step == 0 and signed:
            assert torch.equal(st.load(), torch.zeros(n))  # the first call leaves m at 0
            continue
        if kind == "bfloat16":
            got = st.data.double()
            assert bool(((got - ref).abs() <= ref.abs() * 2.0**-7 * (1 + 1e-5) + 1e-30).all())
            continue
        got = _values(st.data, st.absmax, signed, block)
        amax = torch.nn.functional.pad(ref.abs(), (0, 1024 - n)).view(-1, block)
        scales = amax.amax(1).repeat_interleave(block)[:n]
        lo, hi = _neighbours((ref / scales).clamp(-1, 1), signed)
        tol = 1e-5 * scales
        assert bool(((got >= lo * scales - tol) & (got <= hi * scales + tol)).all())


def test_functional_adopt_takes_stored_moments_and_amp_arguments() -> None:
    """``adopt(..., state_precision=...)`` runs the low-precision kernel; AMP's scale is divided out first and
    a nonzero found_inf skips the call, as for the other eager kernels."""
    from adoptim import adopt

    gen = torch.Generator().manual_seed(8)
    p, g = torch.randn(600, generator=gen), torch.randn(600, generator=gen)
    kw = dict(block_size=256, seed=0, device=torch.device("cpu"))

    def moments() -> tuple[Stored, Stored]:
        return (Stored.empty(600, FORMATS["8bit"].m, signed=True, stream=0, **kw),
                Stored.empty(600, FORMATS["8bit"].v, signed=False, stream=1, **kw))

    runs = []
    for scale, found in ((None, None), (torch.tensor(4.0), torch.tensor(0.0)), (torch.tensor(4.0), torch.tensor(1.0))):
        q, (m, v), s = p.clone(), moments(), torch.tensor(0.0)
        for _ in range(2):
            grad = g if scale is None else g * scale
            adopt([q], [grad], [m], [v], [s], grad_scale=scale, found_inf=found, state_precision="8bit", **HYPER)
        runs.append((q, v.data.clone(), s.item()))
    assert runs[0][2] == 2 and not torch.equal(runs[0][0], p)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # 4*g/4 is g exactly
    assert torch.equal(runs[2][0], p) and runs[2][2] == 0  # skipped, steps included


# ----------------------------------------------------------------------------- the optimizer option
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(100 + t)
        x = torch.randn(16, 80, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_state_layout_and_small_tensors_full(kind: str) -> None:
    gen = torch.Generator().manual_seed(6)
    big, small = torch.randn(5120, generator=gen), torch.randn(4095, generator=gen)
    params = [big.clone().requires_grad_(), small.clone().requires_grad_()]
    plain_params = [big.clone().requires_grad_(), small.clone().requires_grad_()]
    opt = ADOPT(params, state_precision=kind)
    plain = ADOPT(plain_params)
    for _ in range(4):
        grads = [torch.randn(5120, generator=gen), torch.randn(4095, generator=gen)]
        for ps, o in ((params, opt), (plain_params, plain)):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            o.step()
    st = opt.state[params[0]]
    assert st["exp_avg"].shape == (5120,) and st["rounding_seed"].dtype == torch.int64
    if kind == "8bit":
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].shape == (20,)
        nbytes = sum(st[k].numel() * st[k].element_size() for k in st if k.startswith("exp_avg"))
        assert nbytes / 5120 == 2 + 2 * 4 / 256
    else:
        assert st["exp_avg"].dtype == torch.bfloat16
    # under state_min_size: full state, stepped bit for bit as by plain ADOPT
    assert set(opt.state[params[1]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(params[1], plain_params[1])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[params[1]][key], plain.state[plain_params[1]][key])
    # the quantized one moves as with 32-bit state, to within a few percent of its update
    moved, moved32 = params[0].detach() - big, plain_params[0].detach() - big
    assert float((moved - moved32).norm() / moved32.norm()) < 0.05


def test_per_group_override_and_min_size() -> None:
    model = _model()
    opt = ADOPT([{"params": [model[0].weight], "state_precision": "full"},
                 {"params": [model[0].bias, model[2].weight, model[2].bias], "state_min_size": 64}],
                state_precision="8bit")
    _train(model, opt, range(2))
    assert opt.state[model[0].weight]["exp_avg"].shape == model[0].weight.shape
    assert opt.state[model[0].bias]["exp_avg"].dtype == torch.uint8  # 64 elements >= state_min_size 64
    assert opt.state[model[2].bias]["exp_avg"].shape == (5,)
    assert opt.state[model[2].bias]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_resume_is_bit_exact(kind: str) -> None:
    model = _model()
    opt = ADOPT(model.parameters(), state_precision=kind)
    _train(model, opt, range(8))

    resumed = _model()
    opt_a = ADOPT(resumed.parameters(), state_precision=kind)
    _train(resumed, opt_a, range(4))
    saved_model, saved_opt = _roundtrip(resumed.state_dict()), _roundtrip(opt_a.state_dict())
    fresh = _model(seed=5)
    fresh.load_state_dict(saved_model)
    opt_b = ADOPT(fresh.parameters(), state_precision=kind)
    opt_b.load_state_dict(saved_opt)
    _train(fresh, opt_b, range(4, 8))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def test_rounding_is_reproducible_and_seeded_per_parameter() -> None:
    a, b = _model(), _model()
    opt_a = ADOPT(a.parameters(), state_precision="8bit", state_min_size=0)
    opt_b = ADOPT(b.parameters(), state_precision="8bit", state_min_size=0)
    _train(a, opt_a, range(3))
    _train(b, opt_b, range(3))
    seeds = [int(opt_a.state[p]["rounding_seed"]) for p in a.parameters()]
    assert seeds == [0, 1, 2, 3]
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(opt_a.state[p]["exp_avg_sq"], opt_b.state[q]["exp_avg_sq"])


def test_full_checkpoint_into_8bit_and_back() -> None:
    model = _model()
    opt32 = ADOPT(model.parameters())
    _train(model, opt32, range(3))
    sd32 = _roundtrip(opt32.state_dict())
    w = model[0].weight
    m32, v32 = opt32.state[w]["exp_avg"].reshape(-1).double(), opt32.state[w]["exp_avg_sq"].reshape(-1).double()

    opt8 = ADOPT(model.parameters(), state_precision="8bit")
    opt8.load_state_dict(sd32)
    assert opt8.param_groups[0]["state_precision"] == "8bit"
    st = opt8.state[w]
    assert st["exp_avg"].dtype == torch.uint8 and torch.equal(st["step"], sd32["state"][0]["step"])
    for name, ref, signed in (("exp_avg", m32, True), ("exp_avg_sq", v32, False)):
        got = _values(st[name], st[name + "_absmax"], signed, 256)
        scales = st[name + "_absmax"].double().repeat_interleave(256)
        lo, hi = _neighbours(ref / scales, signed)
        assert bool(((got - ref).abs() <= (hi - lo) * scales / 2 * (1 + 1e-6) + 1e-12).all())
    assert opt8.state[model[0].bias]["exp_avg"].shape == (64,)  # small: as saved

    sd8 = _roundtrip(opt8.state_dict())
    back = ADOPT(model.parameters())
    back.load_state_dict(sd8)
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        expect = _values(sd8["state"][0][name], sd8["state"][0][name + "_absmax"], signed, 256)
        assert back.state[w][name].shape == w.shape and back.state[w][name].dtype == torch.float32
        assert torch.equal(back.state[w][name].reshape(-1).double(), expect.float().double())
    assert "rounding_seed" not in back.state[w]
    _train(model, back, range(3, 4))  # and it steps


def test_fused_full_checkpoint_into_bfloat16() -> None:
    model = _model()
    opt32 = ADOPT(model.parameters(), fused=True)
    _train(model, opt32, range(2))
    opt = ADOPT(model.parameters(), state_precision="bfloat16")
    opt.load_state_dict(_roundtrip(opt32.state_dict()))
    group = opt.param_groups[0]
    assert group["fused"] is None and group["state_precision"] == "bfloat16"
    w = model[0].weight
    assert torch.equal(opt.state[w]["exp_avg_sq"], opt32.state[w]["exp_avg_sq"].reshape(-1).to(torch.bfloat16))
    assert opt.state[w]["step"].device.type == "cpu"
    _train(model, opt, range(2, 3))


def test_switching_a_groups_precision_converts_once() -> None:
    p = torch.randn(5000, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(9)).requires_grad_()
    opt = ADOPT([p])
    grads = [torch.randn(5000, generator=torch.Generator().manual_seed(t)).bfloat16() for t in range(5)]
    for t in range(2):
        p.grad = grads[t]
        opt.step()
    full = {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["state_precision"] = "bfloat16"  # a 1-D bfloat16 parameter: its full state is bf16 too
    p.grad = grads[2]
    opt.step()
    entry = opt.state[p]
    assert "rounding_seed" in entry and entry["exp_avg"].shape == (5000,)
    assert torch.equal(entry["step"], full["step"] + 1)
    p.grad = grads[3]
    opt.step()
    assert opt.state[p] is entry  # converted once, then stepped in place
    opt.param_groups[0]["state_precision"] = "8bit"
    p.grad = grads[4]
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8 and opt.state[p]["step"].item() == 5


def test_complex_parameter_as_pairs_of_reals() -> None:
    z = torch.randn(3000, dtype=torch.complex64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    r = torch.view_as_real(z.detach().clone()).requires_grad_()
    opt_z = ADOPT([z], state_precision="8bit")
    opt_r = ADOPT([r], state_precision="8bit")
    for t in range(3):
        g = torch.randn(3000, 2, generator=torch.Generator().manual_seed(t))
        z.grad, r.grad = torch.view_as_complex(g.clone()), g.clone()
        opt_z.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert torch.equal(opt_z.state[z]["exp_avg_sq"], opt_r.state[r]["exp_avg_sq"])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"state_precision": "int8"}, "Invalid state_precision: 'int8'"),
    ({"state_precision": "8bit", "state_block_size": 100}, "Invalid state_block_size: 100"),
    ({"state_precision": "8bit", "state_min_size": -1}, "Invalid state_min_size: -1"),
    ({"state_precision": "8bit", "fused": True}, "together with fused=True"),
    ({"state_precision": "bfloat16", "foreach": True}, "together with foreach=True"),
    ({"state_precision": "8bit", "capturable": True}, "together with capturable=True"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ADOPT(_model().parameters(), **kwargs)
    with pytest.raises(ValueError, match=match):
        ADOPT([{"params": _model().parameters(), **kwargs}])


@pytest.mark.parametrize(("key", "value", "match"), [
    ("exp_avg", torch.zeros(5119, dtype=torch.uint8), r"param group 0 parameter 0 .*exp_avg of torch.uint8"),
    ("exp_avg_sq_absmax", torch.zeros(19), r"param group 0 parameter 0 .*exp_avg_sq_absmax"),
    ("exp_avg", torch.zeros(5120), r"param group 0 parameter 0 .*exp_avg of torch.uint8"),
])
def test_checkpoint_that_does_not_match(key: str, value: torch.Tensor, match: str) -> None:
    model = _model()
    opt = ADOPT(model.parameters(), state_precision="8bit")
    _train(model, opt, range(2))
    bad = _roundtrip(opt.state_dict())
    bad["state"][0][key] = value
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[model[0].weight][k], v)


@pytest.mark.parametrize("target", ["full", "bfloat16"])
def test_8bit_codes_cast_into_another_formats_template_are_refused(target: str) -> None:
    # What torch.distributed.checkpoint does when an 8-bit checkpoint is loaded into an optimizer of another
    # state_precision: it fills the loading optimizer's own state tensors (its template) from the saved ones
    # of the same keys with copy_, so the codes become floats of 0..255 and the scales, not in the template,
    # are left out. Loading that would train from garbage moments without a word.
    model = _model()
    opt8 = ADOPT(model.parameters(), state_precision="8bit")
    _train(model, opt8, range(3))
    saved = _roundtrip(opt8.state_dict())
    other = ADOPT(model.parameters(), state_precision=target)
    _train(model, other, range(1))
    template = _roundtrip(other.state_dict())
    for key, entry in template["state"].items():
        for name, t in entry.items():
            t.copy_(saved["state"][key][name].reshape(t.shape))
    template["param_groups"] = saved["param_groups"]
    before = {k: v.clone() for k, v in other.state[model[0].weight].items()}
    with pytest.raises(ValueError, match=r"param group 0 parameter 0 is 8-bit codes cast to .*state_precision='8bit'"):
        other.load_state_dict(template)
    for k, v in before.items():
        assert torch.equal(other.state[model[0].weight][k], v)
    # The way it names: load into an 8-bit optimizer, then change the group's precision.
    opt = ADOPT(model.parameters(), state_precision="8bit")
    opt.load_state_dict(saved)
    opt.param_groups[0]["state_precision"] = target
    _train(model, opt, range(3, 4))
    assert opt.state[model[0].weight]["exp_avg"].dtype == {"full": torch.float32, "bfloat16": torch.bfloat16}[target]


def test_full_state_under_an_8bit_group_still_loads() -> None:
    # A group switched to 8-bit and saved before its next step holds full moments (converted at that step):
    # real moments, fractional, and m exactly 0 after the first step; neither is taken for cast codes.
    for steps in (1, 3):
        model = _model()
        opt = ADOPT(model.parameters())
        _train(model, opt, range(steps))
        opt.param_groups[0]["state_precision"] = "8bit"
        sd = _roundtrip(opt.state_dict())
        assert sd["state"][0]["exp_avg"].dtype == torch.float32
        fresh = ADOPT(model.parameters())
        fresh.load_state_dict(sd)
        assert torch.equal(fresh.state[model[0].weight]["exp_avg_sq"], opt.state[model[0].weight]["exp_avg_sq"])


def test_state_that_does_not_match_at_step_changes_nothing() -> None:
    model = _model()
    opt = ADOPT(model.parameters(), state_precision="8bit")
    _train(model, opt, range(2))
    opt.state[model[0].weight]["exp_avg_absmax"] = torch.zeros(3)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="param group 0 parameter 0"):
        _train(model, opt, range(2, 3))
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)


def test_full_groups_never_reach_the_low_precision_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the default path called the low-precision code")

    monkeypatch.setattr(LP, "check", refuse)
    monkeypatch.setattr(LP, "place_loaded", refuse)
    model = _model()
    opt = ADOPT(model.parameters())
    _train(model, opt, range(2))
    opt.load_state_dict(opt.state_dict())
    _train(model, opt, range(2, 3))


# ----------------------------------------------------------------------------- the fused 8-bit CPU kernel
@pytest.fixture(scope="module")
def lowbit_lib(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a ctypes library
    """The installed library's fused 8-bit step, or the C file compiled here when the installed library
    was built before it existed."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    from adoptim.kernels import lowbit_cpu

    lib = lowbit_cpu.load()
    if lib is not None:
        return lib
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler, and the installed library predates the fused 8-bit step")
    csrc = Path(lowbit_cpu.__file__).parent / "csrc"
    out = tmp_path_factory.mktemp("lowbit") / "liblowbit.so"
    subprocess.run([cc, "-O3", "-fno-math-errno", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread",
                    f"-I{csrc}", str(csrc / "lowbit.c"), str(csrc / "threads.c"), "-o", str(out), "-ldl"], check=True)
    return lowbit_cpu.load(str(out))


# Every combination of weight decay (none, coupled, decoupled) and maximize: csrc/lowbit.c compiles a loop
# of its own for each (WITH_FLAGS), with and without a clip among them.
FLAG_CASES = [(0.0, False, 0.25, False), (0.0, False, None, True), (1e-2, False, None, False),
              (1e-2, False, 0.25, True), (1e-2, True, 0.25, False), (1e-2, True, 0.25, True)]


def _pair(n: int, fmt, block: int, p0: torch.Tensor) -> list[tuple]:
    kw = dict(block_size=block, seed=11, device=torch.device("cpu"))
    return [(p0.clone(), Stored.empty(n, fmt.m, signed=True, stream=0, **kw),
             Stored.empty(n, fmt.v, signed=False, stream=1, **kw), torch.tensor(0.0)) for _ in range(2)]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize(("wd", "decoupled", "clip", "maximize"), FLAG_CASES)
@pytest.mark.parametrize("lr", [1e-3, "tensor"])
def test_fused_8bit_kernel_writes_the_torch_paths_bits(lowbit_lib, rounding: str, wd: float, decoupled: bool,
                                                       clip: float | None, maximize: bool, lr: object) -> None:
    from adoptim.kernels import lowbit_cpu
    from adoptim.kernels.lowbit import MomentFormat, StateFormat

    stochastic = rounding == "stochastic"
    fmt = StateFormat(MomentFormat("8bit", stochastic), MomentFormat("8bit", stochastic))
    gen = torch.Generator().manual_seed(20)
    n, block = 5000, 64 if stochastic else 256  # a last partial block either way
    lr = torch.tensor(3e-3) if lr == "tensor" else lr
    hyper = Hyper(lr=lr, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=wd, decoupled_weight_decay=decoupled,
                  clip_exponent=clip, maximize=maximize)
    (pa, ma, va, sa), (pb, mb, vb, sb) = _pair(n, fmt, block, torch.randn(n, generator=gen))
    for _ in range(4):
        g = torch.randn(n, generator=gen) * torch.logspace(-5, 1, n)
        g[:300] = 0.0  # a block of zeros (scale 0) and zero second moments
        lowbit_adopt([pa], [g], [ma], [va], [sa], hyper)
        assert lowbit_cpu.lowbit_cpu_adopt([pb], [g], [mb], [vb], [sb], hyper, lib=lowbit_lib) == []
        assert torch.equal(pa, pb) and sa.item() == sb.item()
        for x, y in ((ma, mb), (va, vb)):
            assert torch.equal(x.data, y.data) and torch.equal(x.absmax, y.absmax)
    assert not torch.equal(ma.data, torch.full_like(ma.data, 127))  # it did move m


def test_fused_kernel_leaves_what_it_cannot_take(lowbit_lib) -> None:
    from adoptim.kernels import lowbit_cpu
    from adoptim.kernels.lowbit import MomentFormat, StateFormat

    n = 600
    gen = torch.Generator().manual_seed(21)
    kw = dict(seed=0, device=torch.device("cpu"))
    mixed = StateFormat(MomentFormat("8bit", True), MomentFormat("bfloat16", True))
    # float32 8-bit; float64; bfloat16 state (taken); strided; 8-bit m with bfloat16 v; blocks over 4096; a
    # lazily negated gradient (its memory holds minus its values)
    fmts = [(FORMATS["8bit"], 256), (FORMATS["8bit"], 256), (FORMATS["bfloat16"], 256), (FORMATS["8bit"], 256),
            (mixed, 256), (FORMATS["8bit"], 8192), (FORMATS["bfloat16"], 256)]
    params = [torch.randn(n, generator=gen) for _ in fmts]
    params[1] = params[1].double()
    params[3] = torch.randn(2 * n, generator=gen)[::2]
    grads = [torch.randn(n, generator=gen) for _ in params]
    grads[1] = grads[1].double()
    grads[6] = torch._neg_view(grads[6])
    ms = [Stored.empty(n, f.m, signed=True, stream=0, block_size=b, **kw) for f, b in fmts]
    vs = [Stored.empty(n, f.v, signed=False, stream=1, block_size=b, **kw) for f, b in fmts]
    steps = [torch.tensor(0.0) for _ in params]
    hyper = Hyper(**HYPER)
    assert lowbit_cpu.lowbit_cpu_adopt(params, grads, ms, vs, steps, hyper, lib=lowbit_lib) == [1, 3, 4, 5, 6]
    assert [s.item() for s in steps] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_a_lazily_negated_gradient_steps_as_its_values(kind: str) -> None:
    """A gradient whose memory holds minus its values (torch's neg bit) steps as an equal plain gradient does."""
    runs = []
    for negated in (False, True):
        p = torch.nn.Parameter(torch.randn(8192, generator=torch.Generator().manual_seed(0)))
        opt = ADOPT([p], state_precision=kind)
        for k in range(3):
            g = torch.randn(8192, generator=torch.Generator().manual_seed(k))
            p.grad = torch._neg_view(-g) if negated else g
            opt.step()
        runs.append((p.detach(), opt.state[p]))
    (a, sa), (b, sb) = runs
    assert torch.equal(a, b)
    assert all(torch.equal(sa[key], sb[key]) for key in sa)


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_optimizer_default_low_precision_step_is_the_torch_paths(lowbit_lib, monkeypatch: pytest.MonkeyPatch,
                                                                 kind: str) -> None:
    """With the fused kernel (the default where it is installed) and with fused=False: the same bits."""
    from adoptim.kernels import lowbit_cpu

    monkeypatch.setattr(lowbit_cpu, "_installed", lambda: lowbit_lib)
    calls = []
    real = lowbit_cpu.lowbit_cpu_adopt
    monkeypatch.setattr(lowbit_cpu, "lowbit_cpu_adopt", lambda *a, **k: calls.append(1) or real(*a, **k))
    runs = []
    for fused in (None, False):
        model = _model()
        # state_min_size=0: every tensor low-precision (full ones would take another kernel with fused=False)
        opt = ADOPT(model.parameters(), state_precision=kind, state_min_size=0, fused=fused, weight_decay=1e-3)
        _train(model, opt, range(4))
        runs.append((model, opt))
        if fused is None:
            assert len(calls) == 4  # the fused kernel ran
    assert len(calls) == 4  # and fused=False did not run it
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``x`` (NaNs compare by payload, as every other value)."""
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same_state(a: tuple, b: tuple) -> None:
    """The same parameters, codes, scales and bfloat16 values, bit for bit. A NaN parameter need only be
    NaN in both: which NaN an operation on NaNs returns (its sign, its payload) is the instruction's, and
    torch's own kernels do not define it either."""
    (pa, ma, va, sa), (pb, mb, vb, sb) = a, b
    nan = pa.isnan()
    assert torch.equal(nan, pb.isnan()) and sa.item() == sb.item()
    assert torch.equal(_bits(pa)[~nan], _bits(pb)[~nan])
    for x, y in ((ma, mb), (va, vb)):
        assert torch.equal(_bits(x.data), _bits(y.data))
        if x.absmax is not None:
            assert torch.equal(_bits(x.absmax), _bits(y.absmax))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize(("wd", "decoupled", "clip", "maximize"), FLAG_CASES)
def test_fused_bfloat16_kernel_writes_the_torch_paths_bits(lowbit_lib, rounding: str, wd: float, decoupled: bool,
                                                           clip: float | None, maximize: bool) -> None:
    from adoptim.kernels import lowbit_cpu
    from adoptim.kernels.lowbit import MomentFormat, StateFormat

    stochastic = rounding == "stochastic"
    fmt = StateFormat(MomentFormat("bfloat16", stochastic), MomentFormat("bfloat16", stochastic))
    gen = torch.Generator().manual_seed(23)
    n = 5000  # not a multiple of the kernel's chunks
    hyper = Hyper(lr=torch.tensor(3e-3), beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=wd,
                  decoupled_weight_decay=decoupled, clip_exponent=clip, maximize=maximize)
    a, b = _pair(n, fmt, 256, torch.randn(n, generator=gen))
    for _ in range(4):
        g = torch.randn(n, generator=gen) * torch.logspace(-5, 1, n)
        g[:300] = 0.0
        lowbit_adopt([a[0]], [g], [a[1]], [a[2]], [a[3]], hyper)
        assert lowbit_cpu.lowbit_cpu_adopt([b[0]], [g], [b[1]], [b[2]], [b[3]], hyper, lib=lowbit_lib) == []
        _same_state(a, b)
    assert bool((a[1].data != 0).any())  # it did move m


def test_fused_bfloat16_kernel_at_the_top_of_the_float32_range(lowbit_lib) -> None:
    """Second moments within 2^-8 of the largest float32, where adding the rounding noise can carry into
    the exponent (the torch path then rounds to nearest: to the largest bfloat16 or to infinity), then
    infinite ones: the torch path's bits, though the kernel's loop encodes by a shorter form below that
    top. beta2 = 0.5, so that v can get there (with 0.9999 it stays below: g * g overflows first). The
    first gradients keep v finite, so no infinity in a chunk hides a wrong encode of the others."""
    from adoptim.kernels import lowbit_cpu

    n = 3000
    gen = torch.Generator().manual_seed(26)
    a, b = _pair(n, FORMATS["bfloat16"], 256, torch.randn(n, generator=gen))
    hyper = Hyper(**{**HYPER, "beta2": 0.5})
    in_window = 0
    for t, (low, high) in enumerate([(1.8411e19, 1.8428e19)] * 4 + [(1.8411e19, 1.85e19)] * 2):
        g = (low + (high - low) * torch.rand(n, generator=gen)) * torch.sign(torch.randn(n, generator=gen))
        v_new = a[2].data.view(torch.bfloat16).float() * 0.5 + (g * g) * 0.5  # the float32 v the step encodes
        bits = v_new.view(torch.int32)
        in_window += int(((bits > 0x7F7F0000) & (bits < 0x7F800000)).sum()) if t > 0 else 0
        lowbit_adopt([a[0]], [g], [a[1]], [a[2]], [a[3]], hyper)
        assert lowbit_cpu.lowbit_cpu_adopt([b[0]], [g], [b[1]], [b[2]], [b[3]], hyper, lib=lowbit_lib) == []
        _same_state(a, b)
        assert bool(a[2].data.view(torch.bfloat16).isinf().any()) == (t >= 4)
    assert in_window > 1000


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
@pytest.mark.parametrize(("n", "block"), [(1, 256), (255, 256), (4097, 4096), (3 * 1024 + 17, 1024), (700, 64)])
def test_fused_kernels_edge_cases_write_the_torch_paths_bits(lowbit_lib, kind: str, n: int, block: int) -> None:
    """Tails of blocks, one element, the largest block the kernel takes, NaN and infinite gradients, an
    all-zero block, and denormal and huge values: the torch path's bits, NaN payloads included."""
    from adoptim.kernels import lowbit_cpu

    gen = torch.Generator().manual_seed(n + block)
    hyper = Hyper(**{**HYPER, "weight_decay": 1e-2, "decoupled_weight_decay": True})
    a, b = _pair(n, FORMATS[kind], block, torch.randn(n, generator=gen))
    for t in range(4):
        g = torch.randn(n, generator=gen) * torch.logspace(-40, 30, n)
        if n > 100:
            g[: min(block, n // 2)] = 0.0  # a zero block (or half of one)
            g[n // 2 + 3] = float("nan") if t == 2 else 3e38
            g[n - 2] = float("-inf") if t == 1 else 1e-44
        lowbit_adopt([a[0]], [g], [a[1]], [a[2]], [a[3]], hyper)
        assert lowbit_cpu.lowbit_cpu_adopt([b[0]], [g], [b[1]], [b[2]], [b[3]], hyper, lib=lowbit_lib) == []
        _same_state(a, b)
    if n > 100:
        assert bool(a[0].isnan().any())  # the NaN reached the parameters: the edge was exercised


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_fused_kernels_thread_counts_change_no_bit(lowbit_lib, kind: str, threads: int) -> None:
    from adoptim.kernels import lowbit_cpu

    n = 3 * 65536 + 1000  # enough blocks for three threads, and a partial last block
    gen = torch.Generator().manual_seed(24)
    pairs = _pair(n, FORMATS[kind], 256, torch.randn(n, generator=gen))
    hyper = Hyper(**HYPER)
    prev = torch.get_num_threads()
    try:
        for _ in range(3):
            g = torch.randn(n, generator=gen)
            for count, (p, m, v, s) in zip((1, threads), pairs, strict=True):
                torch.set_num_threads(count)
                assert lowbit_cpu.lowbit_cpu_adopt([p], [g], [m], [v], [s], hyper, lib=lowbit_lib) == []
    finally:
        torch.set_num_threads(prev)
    _same_state(*pairs)


@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_fused_kernel_steps_many_tensors_in_one_call(lowbit_lib, kind: str) -> None:
    """Tensors of different sizes and step counts in one call (their blocks split over two threads), an
    empty one, and two parameters sharing memory (stepped in order): the torch path's bits."""
    from adoptim.kernels import lowbit_cpu

    gen = torch.Generator().manual_seed(25)
    sizes = [70_000, 300, 0, 5000, 40_000]
    shared = torch.randn(1000, generator=gen)
    hyper = Hyper(**{**HYPER, "weight_decay": 1e-2, "decoupled_weight_decay": True})
    runs = []
    for _ in range(2):
        kw = dict(block_size=256, device=torch.device("cpu"))
        base = shared.clone()
        params = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes] + [base[:600], base[400:]]
        fmt = FORMATS[kind]
        ms = [Stored.empty(p.numel(), fmt.m, signed=True, seed=i, stream=0, **kw) for i, p in enumerate(params)]
        vs = [Stored.empty(p.numel(), fmt.v, signed=False, seed=i, stream=1, **kw) for i, p in enumerate(params)]
        steps = [torch.tensor(float(i % 2)) for i in range(len(params))]  # some start at step 1
        runs.append((base, params, ms, vs, steps))
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for t in range(3):
            grads = [torch.randn(p.numel(), generator=torch.Generator().manual_seed(100 * t + i))
                     for i, p in enumerate(runs[0][1])]
            lowbit_adopt(runs[0][1], grads, runs[0][2], runs[0][3], runs[0][4], hyper)
            assert lowbit_cpu.lowbit_cpu_adopt(runs[1][1], grads, runs[1][2], runs[1][3], runs[1][4], hyper,
                                               lib=lowbit_lib) == []
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(runs[0][0], runs[1][0])  # the shared memory, stepped by both views in order
    for i in range(len(sizes) + 2):
        _same_state(*((r[1][i], r[2][i], r[3][i], r[4][i]) for r in runs))
    assert [s.item() for s in runs[1][4]] == [3.0 + i % 2 for i in range(len(sizes) + 2)]
