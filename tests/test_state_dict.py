"""state_dict: bit-identical resume, weights_only loading, older dicts, and refusal of mismatched ones."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from capabilities import KERNELS

import adoptim


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, sched=None) -> None:
    for t in range(start, stop):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_resume_is_bit_identical_and_loads_weights_only(kernel: str, tensor_lr: bool) -> None:
    def make(model):
        lr = torch.tensor(0.01) if tensor_lr else 0.01
        opt = adoptim.ADOPT(
            model.parameters(), lr=lr, weight_decay=0.01, decoupled_weight_decay=True, **KERNELS[kernel]
        )
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    straight = _model()
    opt, sched = make(straight)
    _steps(straight, opt, 0, 10, sched)

    first = _model()
    opt1, sched1 = make(first)
    _steps(first, opt1, 0, 4, sched1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    _steps(resumed, opt2, 4, 10, sched2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], opt2.state[b][key], rtol=0, atol=0)


def test_older_state_dict_without_newer_flags_loads_with_defaults() -> None:
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), clip_exponent=0.5)
    _steps(model, opt, 0, 2)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for key in ("clip_exponent", "maximize", "capturable", "differentiable", "foreach", "decoupled_weight_decay"):
            del g[key]
    fresh = adoptim.ADOPT(model.parameters(), clip_exponent=0.3)
    fresh.load_state_dict(sd)
    g = fresh.param_groups[0]
    assert g["clip_exponent"] == 0.3 and g["maximize"] is False and g["decoupled_weight_decay"] is False
    _steps(model, fresh, 2, 3)
    assert float(fresh.state[next(model.parameters())]["step"]) == 3


def test_python_number_steps_from_old_pickles_become_tensors() -> None:
    model = _model()
    opt = adoptim.ADOPT(model.parameters())
    _steps(model, opt, 0, 2)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = 2
    opt.load_state_dict(sd)
    assert all(torch.is_tensor(st["step"]) and float(st["step"]) == 2 for st in opt.state.values())


def _snapshot(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3, 3)), "does not match the parameters"),
        (lambda sd: sd["state"][2].__setitem__("exp_avg_sq", torch.zeros(7)), "has shape"),
        (lambda sd: sd["state"][1].pop("exp_avg_sq"), "lacks"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "has 3 parameters"),
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 param groups"),
        (lambda sd: sd.pop("state"), "'state' and 'param_groups'"),
        (lambda sd: sd["state"][1].__setitem__("step", None), "parameter 1 has step None"),
        (lambda sd: sd["state"][1].__setitem__("step", "3"), "parameter 1 has step '3'"),
        (lambda sd: sd["state"][1].__setitem__("step", torch.tensor(True)), "of torch.bool"),
        (lambda sd: sd["state"].__setitem__(2, torch.zeros(7)), "parameter 2 is a Tensor, not a dict"),
        (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), r"param group 0 of the state_dict: Invalid lr"),
        (lambda sd: sd["param_groups"][0].__setitem__("betas", (1.5, 0.9)), "beta parameter at index 0"),
        (lambda sd: sd["param_groups"][0].update(foreach=True, fused=True), "param group 0 of the state_dict: .*fused"),
        (lambda sd: sd["param_groups"][0].update(amsgrad=False), "Adam or AdamW"),
    ],
)
def test_mismatched_state_dict_is_rejected_before_any_change(corrupt, message: str) -> None:
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), lr=0.01)
    _steps(model, opt, 0, 3)
    sd = _snapshot(opt)
    for st in sd["state"].values():  # make the dict different so a partial load would show
        st["exp_avg"] = st["exp_avg"] + 1
    sd["param_groups"][0]["lr"] = 0.5
    corrupt(sd)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after = _snapshot(opt)
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][k][key], value)


def test_load_pre_hooks_run_first_and_what_they_return_is_checked() -> None:
    # torch.optim runs the load pre-hooks before anything else: one may adapt a dict (here: drop a key
    # adoptim would refuse). What a hook returns is checked like any dict, before anything changes.
    model = _model()
    opt = adoptim.ADOPT(model.parameters(), lr=0.01)
    _steps(model, opt, 0, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["amsgrad"] = False
    calls = []

    def adapt(o: torch.optim.Optimizer, d: dict) -> dict:
        calls.append(1)
        return {**d, "param_groups": [{k: v for k, v in g.items() if k != "amsgrad"} for g in d["param_groups"]]}

    handle = opt.register_load_state_dict_pre_hook(adapt)
    opt.load_state_dict(sd)
    assert calls == [1]  # once, not again inside torch.optim's load_state_dict
    handle.remove()

    def corrupt(o: torch.optim.Optimizer, d: dict) -> dict:
        d = copy.deepcopy(d)
        d["state"][0]["exp_avg"] = torch.zeros(3)
        return d

    opt.register_load_state_dict_pre_hook(corrupt)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="param group 0 parameter 0 has shape"):
        opt.load_state_dict(_snapshot(opt))
    after = _snapshot(opt)
    for k, st in before["state"].items():
        assert all(torch.equal(after["state"][k][key], value) for key, value in st.items())


def test_complex_state_is_cast_to_its_parameter_on_load() -> None:
    # torch.optim casts loaded state to its parameter's dtype for floating-point parameters only. After
    # a complex64 parameter is cast to complex128, step() refuses the narrower state and names reloading
    # as the remedy, which must then work.
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    opt = adoptim.ADOPT([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.randn(3, dtype=torch.complex64)
        opt.step()
    p.data = p.data.to(torch.complex128)
    p.grad = torch.randn(3, dtype=torch.complex128)
    with pytest.raises(RuntimeError, match="complex64, which cannot hold the parameter's torch.complex128"):
        opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.complex128
    opt.step()
    assert float(opt.state[p]["step"]) == 3
