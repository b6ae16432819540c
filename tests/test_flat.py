"""The opt-in flat layout (``flat=True``): one buffer per (param group, device, dtype), one kernel call each.

Elementwise arithmetic does not care how tensors are laid out, so a flat run must give the default run's
bits, for every kernel, whenever every parameter has a gradient at every step; where backward does not
reach a parameter, the flat layout steps it with a zero gradient (checked against the float64 reference).
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from optim_helpers import FACTS_CHECKERS, use_facts_checker

import adoptim
from adoptim import _flat
from adoptim.kernels import fused_cpu
from adoptim.reference import adopt_step

KERNELS = [dict(fused=True), dict(foreach=True), dict(foreach=False)]
needs_kernel = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


@pytest.fixture(autouse=True, params=FACTS_CHECKERS)
def facts_checker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: the buckets' facts checked in one C call, and in Python."""
    use_facts_checker(request.param, _flat, monkeypatch)
    return request.param


def _ids(flags: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in flags.items())


def _model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def _groups(model: torch.nn.Module, **flat: bool) -> list[dict]:
    """Two groups (weights decayed, biases not), as training scripts make them."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": 0.1, **flat}, {"params": biases, "weight_decay": 0.0, **flat}]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1,
           zero: str = "opt") -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        (opt if zero == "opt" else model).zero_grad()
        x = torch.randn(8, 5, generator=gen).to(dtype)
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero", ["opt", "model"])
def test_flat_run_gives_the_default_runs_bits(flags: dict, dtype: torch.dtype, zero: str) -> None:
    runs = []
    for flat in (False, True):
        model = _model(dtype=dtype)
        opt = adoptim.ADOPT(_groups(model, flat=flat), lr=0.01, decoupled_weight_decay=True, **flags)
        _train(model, opt, steps=6, zero=zero)
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sb = oa.state_dict(), ob.state_dict()
    for key in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][key][name], sb["state"][key][name]), (key, name)


@needs_kernel
def test_parameters_gradients_and_state_are_views_into_one_buffer_per_group_and_dtype() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    opt = adoptim.ADOPT(params, flat=True, fused=True)
    calls = []
    real = fused_cpu.fused_cpu_adopt
    fused_cpu.fused_cpu_adopt = lambda p, *a: calls.append([x.numel() for x in p]) or real(p, *a)
    try:
        for _ in range(2):
            opt.zero_grad()
            (params[0].sum() * params[1].sum() + params[2].pow(2).sum()).backward()
            opt.step()
    finally:
        fused_cpu.fused_cpu_adopt = real
    assert sorted(calls[-2:]) == [[5], [4 * 3 + 4]]  # one tensor per dtype: the whole buffer
    for dtype in (torch.float32, torch.float64):
        group = [p for p in params if p.dtype == dtype]
        storages = {p.untyped_storage().data_ptr() for p in group}
        grads = {p.grad.untyped_storage().data_ptr() for p in group}
        moments = {opt.state[p][k].untyped_storage().data_ptr() for p in group for k in ("exp_avg", "exp_avg_sq")}
        assert len(storages) == 1 and len(grads) == 1 and len(moments) == 2
    grads = [p.grad for p in params]
    opt.zero_grad()  # set_to_none=True: still the views, zeroed in place
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads, strict=True))


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_a_parameter_backward_does_not_reach_steps_with_a_zero_gradient(flags: dict) -> None:
    lr, betas, eps = 0.1, (0.9, 0.99), 1e-6
    a, b = (torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2))
    opt = adoptim.ADOPT([a, b], lr=lr, betas=betas, eps=eps, flat=True, **flags)
    for k in range(4):
        opt.zero_grad()
        ((a * (k + 1.0)).sum() + (b.sum() if k < 2 else 0.0)).backward()  # b is used in the first two steps
        st = opt.state[b] if opt.state else {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
        g_b = [1.0 if k < 2 else 0.0] * 4
        want_b = adopt_step(b.detach().tolist(), g_b, st["exp_avg"].tolist(), st["exp_avg_sq"].tolist(), k,
                            lr=lr, beta1=betas[0], beta2=betas[1], eps=eps)
        opt.step()
        torch.testing.assert_close(b.detach(), torch.tensor(want_b[0], dtype=torch.float64), rtol=1e-13, atol=1e-15)
    assert float(opt.state[b]["step"]) == float(opt.state[a]["step"]) == 4
    assert opt.state[b]["exp_avg"].abs().min() > 0  # its momentum from the step it had a gradient still moves it


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_state_dict_loads_across_layouts_and_with_weights_only(flags: dict) -> None:
    # Five steps flat, saved, then three more: flat, and in a default-layout optimizer loaded from the save;
    # and the other way round. All three continue bit for bit.
    model = _model()
    opt = adoptim.ADOPT(_groups(model, flat=True), lr=0.01, **flags)
    _train(model, opt, steps=5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved = opt.state_dict()
    ids = [id(st["step"]) for st in saved["state"].values()]
    assert len(set(ids)) == len(ids)  # one step tensor per parameter in the saved state
    finals = []
    for flat in (True, False, "fresh flat"):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        if flat is True:
            m, o = model, opt
        else:
            m = _model(seed=3)
            m.load_state_dict(ckpt["model"])
            o = adoptim.ADOPT(_groups(m, flat=flat == "fresh flat"), lr=0.01, **flags)
            o.load_state_dict(ckpt["opt"])
            assert all(g["flat"] == (flat == "fresh flat") for g in o.param_groups)  # the run's layout
        _train(m, o, steps=3, seed=7)
        finals.append([p.detach().clone() for p in m.parameters()])
    for other in finals[1:]:
        assert all(torch.equal(x, y) for x, y in zip(finals[0], other, strict=True))


def test_loading_state_whose_steps_differ_into_a_flat_group_is_refused_before_anything_changes() -> None:
    model = _model()
    default = adoptim.ADOPT(model.parameters(), lr=0.01)
    _train(model, default, steps=2)
    sd = default.state_dict()
    sd["state"][1]["step"] = torch.tensor(7.0)
    flat_model = _model()
    opt = adoptim.ADOPT(flat_model.parameters(), lr=0.01, flat=True)
    _train(flat_model, opt, steps=1)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="param group 0 is flat .* steps of its parameters differ: \\[2.0, 7.0\\]"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][k][n], after["state"][k][n]) for k in before["state"] for n in
               ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("what", ["parameter", "gradient", "exp_avg", "exp_avg_sq", "step"])
def test_data_replaced_ends_the_flat_layout_and_the_run_goes_on_exactly(flags: dict, what: str) -> None:
    runs = []
    for flat in (False, True):
        model = _model()
        opt = adoptim.ADOPT(model.parameters(), lr=0.01, flat=flat, **flags)
        _train(model, opt, steps=3)
        p = next(model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if what == "parameter":
                p.data = p.data.clone()
            elif what == "gradient":
                p.grad.data = p.grad.data.clone()
            else:
                t = opt.state[p][what]
                t.data = t.data.clone()
            _train(model, opt, steps=3, seed=5)
        broke = [w for w in caught if "ends the group's flat layout" in str(w.message)]
        assert len(broke) == (1 if flat else 0)
        if flat:
            assert not opt.param_groups[0]["flat"]
            steps = [opt.state[q]["step"] for q in model.parameters()]
            assert len({id(s) for s in steps}) == len(steps)  # each parameter counts on its own again
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_construction_errors_name_the_parameter() -> None:
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="parameter 1, which does not require grad"):
        adoptim.ADOPT([torch.nn.Parameter(torch.zeros(2)), frozen], flat=True)
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="listed twice"):
        adoptim.ADOPT([p, p], flat=True)
    with pytest.raises(ValueError, match="flat: True together with differentiable=True"):
        adoptim.ADOPT([p], flat=True, differentiable=True)
    with pytest.raises(ValueError, match="Invalid flat: 1"):
        adoptim.ADOPT([p], flat=1)
    opt = adoptim.ADOPT([p])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.add_param_group({"params": [frozen], "flat": True})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_a_flat_group_added_later_and_a_pickled_optimizer(flags: dict) -> None:
    runs = []
    for flat in (False, True):
        model = _model()
        weights, biases = (list(g["params"]) for g in _groups(model))
        opt = adoptim.ADOPT(weights, lr=0.01, flat=flat, **flags)
        _train(model, opt, steps=2)
        opt.add_param_group({"params": biases, "flat": flat})
        _train(model, opt, steps=2, seed=4)
        runs.append((model, opt))
    (a, _), (b, opt) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    # An unpickled flat optimizer has its own copies of the parameters and state, laid out again at its
    # first step; with the same gradients (assigned by hand: copied into the buffers) it goes on as the original.
    clone = pickle.loads(pickle.dumps(opt))
    params = [p for g in opt.param_groups for p in g["params"]]
    copies = [p for g in clone.param_groups for p in g["params"]]
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p, q in zip(params, copies, strict=True):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        clone.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies, strict=True))


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
@pytest.mark.parametrize("how", ["load_state_dict", "entry set by hand"])
def test_state_written_into_a_running_flat_optimizer_is_taken_into_its_buffers(flags: dict, how: str) -> None:
    # A running flat optimizer whose state is replaced (a checkpoint loaded, an entry set) steps from the
    # new values, as a default-layout optimizer given the same state does.
    source_model = _model(seed=5)
    source = adoptim.ADOPT(source_model.parameters(), lr=0.01, **flags)
    _train(source_model, source, steps=4, seed=8)
    saved = source.state_dict()
    runs = []
    for flat in (False, True):
        model = _model()
        opt = adoptim.ADOPT(model.parameters(), lr=0.01, flat=flat, **flags)
        _train(model, opt, steps=3)
        if how == "load_state_dict":
            opt.load_state_dict(copy.deepcopy(saved))
        else:
            for i, p in enumerate(model.parameters()):
                opt.state[p] = {k: v.clone() for k, v in saved["state"][i].items()}
        _train(model, opt, steps=2, seed=6)
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert float(ob.state[next(b.parameters())]["step"]) == 6


@pytest.mark.parametrize("flags", KERNELS, ids=_ids)
def test_a_step_counts_as_an_in_place_change_of_every_parameter(flags: dict) -> None:
    """As in the default layout: a backward through a graph that saved a parameter before the step is refused."""
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), lr=0.01, flat=True, **flags)
    _train(model, opt, steps=2)
    weight = model[0].weight
    saved = (weight ** 2).sum()  # pow saves its input
    before = weight._version
    _train(model, opt, steps=1)
    assert weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()

