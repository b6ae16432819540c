"""Bad input: a ValueError naming the argument and the value; sparse gradients refused with nothing changed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from capabilities import KERNELS

import adoptim


def _p() -> list[torch.Tensor]:
    return [torch.zeros(2, requires_grad=True)]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(lr=-1e-3), r"Invalid lr: -0\.001"),
        (dict(lr=math.nan), r"Invalid lr: nan"),
        (dict(lr=math.inf), r"Invalid lr: inf"),
        (dict(lr="0.1"), r"Invalid lr: '0\.1'"),
        (dict(lr=torch.tensor([0.1, 0.2])), r"Invalid lr: a tensor lr must be a one-element"),
        (dict(lr=torch.tensor(-0.1)), r"Invalid lr: -0\.1"),
        (dict(betas=(1.0, 0.9)), r"beta parameter at index 0: 1\.0"),
        (dict(betas=(0.9, -0.1)), r"beta parameter at index 1: -0\.1"),
        (dict(betas=(0.9, 1.5)), r"beta parameter at index 1: 1\.5"),
        (dict(betas=(0.9,)), r"Invalid betas: \(0\.9,\)"),
        (dict(betas=0.9), r"Invalid betas: 0\.9"),
        (dict(betas=(torch.tensor([0.9, 0.8]), 0.9)), r"beta parameter at index 0: a tensor of 2 elements"),
        (dict(betas=(0.9, torch.tensor(1))), r"beta parameter at index 1: a tensor of 1 elements of torch\.int64"),
        (dict(betas=(0.9, torch.tensor(1.0))), r"beta parameter at index 1: 1\.0"),
        (dict(eps=0.0), r"Invalid eps: 0\.0"),
        (dict(eps=-1e-8), r"Invalid eps: -1e-08"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay: -0\.1"),
        (dict(weight_decay=math.nan), r"Invalid weight_decay: nan"),
        (dict(clip_exponent=-0.25), r"Invalid clip_exponent: -0\.25"),
        (dict(clip_exponent="1/4"), r"Invalid clip_exponent: '1/4'"),
        (dict(maximize="yes"), r"Invalid maximize: 'yes'"),
        (dict(foreach=1), r"Invalid foreach: 1"),
        (dict(decoupled_weight_decay=None), r"Invalid decoupled_weight_decay: None"),
        (dict(foreach=True, differentiable=True), r"Invalid foreach: True together with differentiable=True"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        adoptim.ADOPT(_p(), **kwargs)


def test_invalid_group_in_add_param_group() -> None:
    opt = adoptim.ADOPT(_p())
    with pytest.raises(ValueError, match=r"Invalid lr: -2"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": -2})
    assert len(opt.param_groups) == 1


def test_add_param_group_of_a_non_dict_raises_torchs_type_error() -> None:
    opt = adoptim.ADOPT(_p())
    for bad in ([torch.zeros(1, requires_grad=True)], torch.zeros(1, requires_grad=True), None):
        with pytest.raises(TypeError, match=r"param_group must be a dict, but got"):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=list(KERNELS))
def test_one_element_tensor_betas_are_read_as_numbers(kernel: dict) -> None:
    # torch.optim takes them; ADOPT reads each once into a float, so both forms step alike, bit for bit.
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    a = adoptim.ADOPT([p], betas=(torch.tensor(0.8), torch.tensor(0.95, dtype=torch.float64)), **kernel)
    betas = (float(torch.tensor(0.8)), 0.95)  # the float32 tensor holds 0.800000011920929
    b = adoptim.ADOPT([q], betas=betas, **kernel)
    assert a.param_groups[0]["betas"] == betas and all(type(x) is float for x in a.param_groups[0]["betas"])
    for _ in range(3):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)


def test_adoptw_validates_too() -> None:
    with pytest.raises(ValueError, match=r"Invalid weight_decay: -1"):
        adoptim.ADOPTW(_p(), weight_decay=-1)


@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_gradient_is_refused_before_anything_changes(foreach: bool) -> None:
    dense = torch.ones(3, requires_grad=True)
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = adoptim.ADOPT([{"params": [dense]}, {"params": emb.parameters()}], foreach=foreach)
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 3])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param group 1 parameter 0\)"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and torch.equal(emb.weight.detach(), before)
    assert len(opt.state) == 0  # not even the first group's state was created


def test_state_that_no_longer_matches_its_parameter_is_refused_at_step() -> None:
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = adoptim.ADOPT([a, b])
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    opt.state[b]["exp_avg"] = torch.zeros(5)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"parameter 1 does not match it"):
        opt.step()
    assert float(opt.state[a]["step"]) == 1 and torch.equal(a.detach(), torch.ones(3))


def test_functional_form_checks_list_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        adoptim.adopt(
            [torch.zeros(1)], [], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(())],
            beta1=0.9, beta2=0.9, lr=0.1, weight_decay=0.0, decoupled_weight_decay=False,
            clip_exponent=0.25, eps=1e-6, maximize=False,
        )


def test_differentiable_step_counter_with_grad_is_refused_before_anything_changes() -> None:
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = adoptim.ADOPT([{"params": [a]}, {"params": [b]}], differentiable=True)
    opt.state[b] = {
        "step": torch.tensor(1.0, requires_grad=True), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.ones(2)
    }
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(RuntimeError, match=r"`step` in differentiable mode \(param group 1 parameter 0\)"):
        opt.step()
    assert len(opt.state[a]) == 0 and torch.equal(a.detach(), torch.ones(2))


def _two_layer_steps(dtype: torch.dtype, **flags: object) -> tuple[list[torch.nn.Linear], adoptim.ADOPT]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 3).to(dtype), torch.nn.Linear(3, 2).to(dtype)]
    opt = adoptim.ADOPT([{"params": layers[0].parameters()}, {"params": layers[1].parameters()}], **flags)
    for _ in range(2):
        for layer in layers:
            for p in layer.parameters():
                p.grad = torch.randn_like(p)
        opt.step()
    return layers, opt


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_state_narrower_than_a_parameter_cast_after_steps_is_refused_before_anything_changes(kernel: str) -> None:
    # A model cast to a wider dtype after some steps (model.half() ... model.float()) keeps its state in
    # the old dtype. The kernels would raise inside the second group, after the first had stepped.
    layers, opt = _two_layer_steps(torch.float16, **KERNELS[kernel])
    layers[1].float()
    for layer in layers:
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for layer in layers for p in layer.parameters()]
    with pytest.raises(RuntimeError, match=r"param group 1 parameter 0: exp_avg is torch.float16, which cannot "
                                           r"hold the parameter's torch.float32"):
        opt.step()
    after = opt.state_dict()
    for i, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert all(torch.equal(a, b) for a, b in zip(weights, (p for layer in layers for p in layer.parameters())))
    # The remedy the message names: reloading casts the state to its parameter's dtype.
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt.state[layers[1].weight]["exp_avg"].dtype == torch.float32
    assert float(opt.state[layers[1].weight]["step"]) == 3


def _functional(params: list[torch.Tensor], **kwargs: object) -> list[list[torch.Tensor]]:
    lists = [params, [torch.ones_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.ones_like(p) for p in params], [torch.tensor(1.0) for _ in params]]
    adoptim.adopt(*lists, beta1=0.9, beta2=0.99, weight_decay=0.0, decoupled_weight_decay=False,
                  clip_exponent=0.25, eps=1e-6, maximize=False, **{"lr": 0.1, **kwargs})
    return lists


def test_functional_fused_refuses_an_unsupported_device_before_any_parameter_steps() -> None:
    cpu = torch.ones(3)
    with pytest.raises(ValueError, match="fused=True supports parameters on cpu and cuda, got one on meta"):
        _functional([cpu, torch.ones(3, device="meta")], fused=True)
    assert torch.equal(cpu, torch.ones(3))  # the CPU parameter, listed first, did not step


@pytest.mark.parametrize("kernel", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_functional_takes_a_one_element_tensor_lr_of_any_shape(kernel: dict) -> None:
    # The optimizer's groups hold a 0-dim lr; the functional form gets what the caller has.
    want = _functional([torch.ones(3)], **kernel)
    got = _functional([torch.ones(3)], lr=torch.tensor([0.1]), **kernel)
    assert all(torch.equal(a, b) for a, b in zip(sum(want, []), sum(got, [])))
    with pytest.raises(ValueError, match=r"a tensor lr must have one element, got shape \(2,\)"):
        _functional([torch.ones(3)], lr=torch.tensor([0.1, 0.2]), **kernel)
