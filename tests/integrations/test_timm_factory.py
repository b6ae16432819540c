"""timm's ``create_optimizer_v2(model, "adoptim")`` builds adoptim's ADOPT as timm builds its own optimizers.

These tests need timm, which needs a torchvision that matches torch; they carry the ``timm`` marker and
skip when timm cannot be imported (a separate CI stage runs them in an environment that has it).
"""

from __future__ import annotations

import pytest
import torch

from adoptim import ADOPT
from adoptim.reference import ReferenceADOPT

pytestmark = pytest.mark.timm
pytest.importorskip("timm", exc_type=ImportError)
import timm.optim  # noqa: E402

from adoptim.integrations.timm import register  # noqa: E402


class Net(torch.nn.Module):
    """A conv net with every kind of parameter timm's factory sorts: conv, norm, bias, a named token."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)
        self.token = torch.nn.Parameter(torch.zeros(1, 4, 1, 1))

    def no_weight_decay(self) -> set[str]:
        return {"token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.norm(self.conv(x)) + self.token).mean((2, 3)))


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register()


def _groups_by_name(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


def test_registered_names_are_listed_and_distinct_from_timms_adopt(registered):
    assert set(registered) <= set(timm.optim.list_optimizers())
    assert timm.optim.get_optimizer_class("adoptim", bind_defaults=False) is ADOPT
    assert timm.optim.get_optimizer_class("adopt", bind_defaults=False) is not ADOPT
    assert register() == registered  # idempotent


def test_factory_builds_adopt_with_timms_weight_decay_exclusion_and_user_betas():
    model = Net()
    opt = timm.optim.create_optimizer_v2(
        model, "adoptim", lr=2e-3, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-7, clip_exponent=None
    )
    assert type(opt) is ADOPT
    groups = _groups_by_name(model, opt)
    # Exactly timm's rule: >= 2-d weights decay; 1-d (norm, bias) and no_weight_decay() names do not.
    assert groups["conv.weight"]["weight_decay"] == groups["head.weight"]["weight_decay"] == 0.05
    for name in ("norm.weight", "norm.bias", "head.bias", "token"):
        assert groups[name]["weight_decay"] == 0.0, name
    for g in opt.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7 and g["lr"] == 2e-3
        assert g["clip_exponent"] is None and g["decoupled_weight_decay"] is False
    expected = timm.optim.param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in expected]


def test_adoptimw_decouples_and_defaults_follow_adoptim():
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, "adoptimw", lr=1e-3, weight_decay=0.1)
    assert type(opt) is ADOPT
    assert all(g["decoupled_weight_decay"] for g in opt.param_groups)
    # Not timm's Adopt defaults: the paper's clip exponent 0.25 and betas (0.9, 0.9999).
    assert all(g["clip_exponent"] == 0.25 and g["betas"] == (0.9, 0.9999) for g in opt.param_groups)


def test_factory_optimizer_steps_as_the_reference():
    torch.manual_seed(0)
    model = Net().double()
    hyper = dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95))
    opt = timm.optim.create_optimizer_v2(model, "adoptimw", foreach=True, **hyper)
    decay = [p for g in opt.param_groups if g["weight_decay"] for p in g["params"]]
    plain = [p for g in opt.param_groups if not g["weight_decay"] for p in g["params"]]
    common = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, decoupled_weight_decay=True)
    ref_decay = ReferenceADOPT(decay, weight_decay=0.05, **common)
    ref_plain = ReferenceADOPT(plain, weight_decay=0.0, **common)
    x = torch.randn(6, 2, 3, 5, 5, dtype=torch.float64)
    for t in range(6):
        opt.zero_grad()
        model(x[t]).square().mean().backward()
        ref_decay.step([p.grad for p in decay])
        ref_plain.step([p.grad for p in plain])
        opt.step()
        for p, q in zip(decay + plain, ref_decay.params() + ref_plain.params()):
            torch.testing.assert_close(p.detach(), q, atol=1e-12, rtol=1e-12)


# -- low-precision state ---------------------------------------------------------------------------------
def _grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(4, 3, 6, 6, generator=gen)).square().mean().backward()


def test_state_options_reach_adopt_and_store_the_moments_as_asked():
    model = Net()
    opt = timm.optim.create_optimizer_v2(model, "adoptim", lr=1e-3, weight_decay=0.05, state_precision="8bit",
                                         state_block_size=64, state_min_size=100)
    assert type(opt) is ADOPT
    assert all(g["state_precision"] == "8bit" and g["state_block_size"] == 64 and g["state_min_size"] == 100
               for g in opt.param_groups)
    for seed in range(2):
        _grads(model, seed)
        opt.step()
    conv = opt.state[model.conv.weight]  # 4 * 3 * 3 * 3 = 108 elements: at least state_min_size
    assert conv["exp_avg"].dtype == torch.uint8 and conv["exp_avg"].shape == (108,)
    assert conv["exp_avg_sq_absmax"].shape == (2,)  # ceil(108 / 64) blocks
    head = opt.state[model.head.weight]  # 8 elements: below state_min_size, full state
    assert head["exp_avg"].dtype == torch.float32 and head["exp_avg"].shape == (2, 4)


@pytest.mark.parametrize("name,decoupled,precision", [
    ("adoptim8bit", False, "8bit"), ("adoptimw8bit", True, "8bit"),
    ("adoptimbf16", False, "bfloat16"), ("adoptimwbf16", True, "bfloat16"),
])
def test_low_precision_names_step_as_adopt_built_by_hand_on_timms_groups(name, decoupled, precision):
    torch.manual_seed(0)
    model = Net()
    twin = Net()
    twin.load_state_dict(model.state_dict())
    opt = timm.optim.create_optimizer_v2(model, name, lr=1e-2, weight_decay=0.05, state_min_size=16)
    groups = timm.optim.param_groups_weight_decay(twin, 0.05, no_weight_decay_list=twin.no_weight_decay())
    hand = ADOPT(groups, lr=1e-2, decoupled_weight_decay=decoupled, state_precision=precision, state_min_size=16)
    assert all(g["state_precision"] == precision and g["decoupled_weight_decay"] is decoupled
               for g in opt.param_groups)
    for seed in range(4):
        for m, o in ((model, opt), (twin, hand)):
            _grads(m, seed)
            o.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=n)
    assert opt.state[model.conv.weight]["exp_avg"].dtype == (torch.uint8 if precision == "8bit" else torch.bfloat16)
    assert {"adoptim8bit", "adoptimw8bit"} <= set(timm.optim.list_optimizers("*8bit"))


def test_an_explicit_state_precision_wins_over_the_names_default():
    opt = timm.optim.create_optimizer_v2(Net(), "adoptim8bit", lr=1e-3, state_precision="full")
    assert all(g["state_precision"] == "full" for g in opt.param_groups)


def test_timms_command_line_opt_kwargs_reach_adopt():
    # timm's train.py: --opt adoptimw --opt-kwargs state_precision=8bit state_block_size=128
    import argparse

    from timm.utils import ParseKwargs

    parser = argparse.ArgumentParser()
    parser.add_argument("--opt", default="sgd")
    parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
    for key, value in dict(lr=1e-3, weight_decay=0.05, momentum=0.9).items():
        parser.add_argument(f"--{key}", type=float, default=value)
    args = parser.parse_args(["--opt", "adoptimw", "--opt-kwargs", "state_precision=8bit", "state_block_size=128"])
    args.opt_args = args.opt_kwargs
    opt = timm.optim.create_optimizer_v2(Net(), **timm.optim.optimizer_kwargs(cfg=args))
    assert type(opt) is ADOPT
    assert all(g["state_precision"] == "8bit" and g["state_block_size"] == 128 and g["decoupled_weight_decay"]
               for g in opt.param_groups)


def test_a_bad_state_option_is_one_line_naming_it():
    with pytest.raises(ValueError) as err:
        timm.optim.create_optimizer_v2(Net(), "adoptim", lr=1e-3, state_precision="4bit")
    assert "state_precision" in str(err.value) and "4bit" in str(err.value) and "\n" not in str(err.value)
