"""What torch.optim users rely on: groups, schedulers, closures, hooks, complex, maximize, copies."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from capabilities import KERNELS
from torch.optim import lr_scheduler as S

import adoptim
from adoptim.reference import ReferenceADOPT


def _quadratic_grads(params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        p.grad = (p - (i + 1.0)).detach() * 2.0  # gradient of sum((p - i - 1)^2)


def test_param_groups_have_their_own_hyperparameters() -> None:
    a0, b0 = torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    h_a = dict(lr=0.05, betas=(0.8, 0.5), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=None)
    h_b = dict(
        lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.2, decoupled_weight_decay=False, clip_exponent=0.25
    )
    opt = adoptim.ADOPT([{"params": [a], **h_a}, {"params": [b], **h_b}])
    refs = []
    for p0, h in ((a0, h_a), (b0, h_b)):
        h = dict(h)
        beta1, beta2 = h.pop("betas")
        refs.append(ReferenceADOPT([p0], beta1=beta1, beta2=beta2, **h))
    for _ in range(10):
        _quadratic_grads([a, b])
        for ref, p in zip(refs, (a, b)):
            ref.step([p.grad])
        opt.step()
    for ref, p in zip(refs, (a, b)):
        torch.testing.assert_close(p.detach(), ref.params()[0], rtol=1e-12, atol=1e-14)


SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=8),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=4),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=3),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=8, power=2.0),
    "LambdaLR": lambda o: S.LambdaLR(o, lr_lambda=lambda t: 1.0 / (1 + t)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lr_lambda=lambda t: 0.9),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=12),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, gamma=0.9), S.StepLR(o, 2, 0.5)]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_every_lr_scheduler(name: str, tensor_lr: bool) -> None:
    """The schedule ADOPT sees equals the one torch's Adam sees, and each update uses the current lr."""
    p0 = torch.randn(5, dtype=torch.float64)
    lr0 = 0.05
    p = p0.clone().requires_grad_()
    q = p0.clone().requires_grad_()
    opt = adoptim.ADOPT([p], lr=torch.tensor(lr0) if tensor_lr else lr0, betas=(0.9, 0.99))
    adam = torch.optim.Adam([q], lr=lr0, betas=(0.9, 0.99))
    sched, adam_sched = SCHEDULERS[name](opt), SCHEDULERS[name](adam)
    ref = ReferenceADOPT([p0], lr=lr0, beta1=0.9, beta2=0.99, eps=1e-6)
    lrs = []
    for _ in range(12):
        lr_now = float(opt.param_groups[0]["lr"])
        assert lr_now == pytest.approx(adam.param_groups[0]["lr"], rel=1e-6)
        lrs.append(lr_now)
        ref.hyper["lr"] = lr_now
        if name in ("CyclicLR", "OneCycleLR"):  # they cycle beta1 like momentum, as they do for Adam
            ref.hyper["beta1"] = opt.param_groups[0]["betas"][0]
            assert opt.param_groups[0]["betas"] == adam.param_groups[0]["betas"]
        _quadratic_grads([p])
        ref.step([p.grad])
        opt.step()
        if name == "ReduceLROnPlateau":
            sched.step(1.0)
            adam_sched.step(1.0)
        else:
            sched.step()
            adam_sched.step()
        if tensor_lr:
            assert torch.is_tensor(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1, "the schedule never changed the lr"
    # The tensor lr is float32 (its default dtype): each update then uses lr rounded to float32.
    tol = dict(rtol=1e-6, atol=1e-8) if tensor_lr else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p.detach(), ref.params()[0], **tol)


def test_closure_is_evaluated_with_grad_and_its_loss_returned() -> None:
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = adoptim.ADOPT([w], lr=0.1)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert calls == [True]
    assert opt.state[w]["exp_avg_sq"].tolist() == [4.0, 16.0]  # first call: v = g^2


def test_zero_grad_and_step_hooks() -> None:
    w = torch.ones(3, requires_grad=True)
    opt = adoptim.ADOPT([w])
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: events.append("post"))
    w.sum().backward()
    opt.step()
    assert events == ["pre", "post"]
    opt.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_complex_equals_view_as_real(kernel: str) -> None:
    # Bit for bit, coupled decay included: the kernels add weight_decay * p on the real view, since
    # complex arithmetic rounds the product and the sum separately where a real add may fuse them. (On
    # 12 elements the difference showed for about one draw in forty; on 2048 it shows at every run.)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(64, 32, dtype=torch.complex64, generator=g)
    z = z0.clone().requires_grad_()
    r = torch.view_as_real(z0).clone().requires_grad_()
    oz = adoptim.ADOPT([z], lr=0.01, weight_decay=0.1, **KERNELS[kernel])
    orr = adoptim.ADOPT([r], lr=0.01, weight_decay=0.1, **KERNELS[kernel])
    for _ in range(8):
        gr = torch.randn(64, 32, 2, generator=g)
        z.grad, r.grad = torch.view_as_complex(gr.clone()), gr.clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_maximize_equals_minimizing_the_negation(kernel: str) -> None:
    a0 = torch.randn(6)
    a, b = a0.clone().requires_grad_(), a0.clone().requires_grad_()
    oa = adoptim.ADOPT([a], lr=0.01, maximize=True, **KERNELS[kernel])
    ob = adoptim.ADOPT([b], lr=0.01, **KERNELS[kernel])
    for t in range(6):
        g = torch.randn(6, generator=torch.Generator().manual_seed(t))
        a.grad, b.grad = g.clone(), -g
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_printing_and_deepcopy_continue_identically() -> None:
    model = torch.nn.Linear(3, 2)
    opt = adoptim.ADOPT(model.parameters(), lr=0.01, clip_exponent=None)
    text = repr(opt)
    assert text.startswith("ADOPT (") and "clip_exponent: None" in text and "lr: 0.01" in text
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    model2 = copy.deepcopy(model)
    opt2 = copy.deepcopy(opt)  # a deep copy of the optimizer refers to its own copies of the params
    opt2.param_groups[0]["params"] = list(model2.parameters())
    opt2.state = {p2: opt2.state[p1] for p1, p2 in zip(opt2.state, model2.parameters())}
    for m, o in ((model, opt), (model2, opt2)):
        for _ in range(3):
            o.zero_grad()
            m(x).sum().backward()
            o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_read_before_the_first_step_is_the_state_the_step_fills(kernel: str) -> None:
    # Reading opt.state[p] before the first step makes an empty dict (torch.optim's state is a
    # defaultdict); code that keeps that dict must find the state in it afterwards, as with torch's Adam.
    p = torch.nn.Parameter(torch.ones(3))
    opt = adoptim.ADOPT([p], lr=0.1, **KERNELS[kernel])
    held = opt.state[p]
    assert held == {}
    p.grad = torch.full((3,), 2.0)
    opt.step()
    assert opt.state[p] is held
    assert float(held["step"]) == 1 and torch.equal(held["exp_avg_sq"], torch.full((3,), 4.0))  # v = g*g
    assert torch.equal(held["exp_avg"], torch.zeros(3))


def test_adoptw_defaults() -> None:
    opt = adoptim.ADOPTW([torch.zeros(1, requires_grad=True)])
    g = opt.param_groups[0]
    assert g["decoupled_weight_decay"] is True and g["weight_decay"] == 1e-2
    assert (g["lr"], g["betas"], g["eps"], g["clip_exponent"]) == (1e-3, (0.9, 0.9999), 1e-6, 0.25)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("step", [0.0, 3.0])
def test_differentiable_step_passes_gradcheck(capturable: bool, step: float) -> None:
    """With differentiable=True the update (p and v, on the first call and a later one) is a
    differentiable function of the parameter, the gradient and v, in the eager and capturable forms."""

    def update(p: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = p.clone()  # a non-leaf, so the optimizer may update it in place under autograd
        p.grad = g
        opt = adoptim.ADOPT([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1, differentiable=True,
                            capturable=capturable)
        opt.state[p] = {
            "step": torch.tensor(step, dtype=torch.float64), "exp_avg": torch.zeros_like(p), "exp_avg_sq": v.clone()
        }
        opt.step()
        return p, opt.state[p]["exp_avg_sq"]

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    g = (0.3 * torch.randn(4, dtype=torch.float64, generator=gen)).requires_grad_()
    v = (torch.rand(4, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(update, (p, g, v))


def test_docstring_examples_run() -> None:
    for module in (adoptim.functional, adoptim.optimizer):
        failed, attempted = doctest.testmod(module, extraglobs={"torch": torch, "ADOPT": adoptim.ADOPT})
        assert attempted > 0 and failed == 0, module.__name__


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_step_bumps_the_parameters_version_counters(kernel: str) -> None:
    # As any in-place update: autograd then refuses a backward through a graph that saved a parameter
    # before the step, rather than silently using the stepped values. (The fused C loops write behind
    # autograd's back, so they bump the counters themselves; torch's CPU fused AdamW does not.)
    w = torch.nn.Parameter(torch.randn(3))
    opt = adoptim.ADOPT([w], lr=0.1, **KERNELS[kernel])
    w.grad = torch.ones(3)
    opt.step()  # the first call only sets v
    x = torch.randn(3, requires_grad=True)
    y = (w * x).sum()  # saves w
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
