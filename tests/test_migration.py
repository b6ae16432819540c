"""State written by the official torch-adopt package and by timm's Adopt loads and continues exactly."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import sys
import types
from unittest import mock

import pytest
import torch

import adoptim


def _official():
    return pytest.importorskip("adopt", reason="torch-adopt is a test dependency").ADOPT


def _timm_adopt():
    """timm's Adopt class; without torchvision, its module is imported without running timm/__init__."""
    try:
        from timm.optim.adopt import Adopt

        return Adopt
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    root = spec.submodule_search_locations[0]
    timm_pkg, optim_pkg = types.ModuleType("timm"), types.ModuleType("timm.optim")
    timm_pkg.__path__, optim_pkg.__path__ = [root], [f"{root}/optim"]
    with mock.patch.dict(sys.modules, {"timm": timm_pkg, "timm.optim": optim_pkg}):
        return importlib.import_module("timm.optim.adopt").Adopt


def _model() -> torch.nn.Module:
    # Large enough (1.4k parameters) that the fused and for-loop kernels differ in some last bits, so a
    # continuation on the wrong kernel shows.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 6))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(t))
        model(x).pow(2).sum().backward()
        opt.step()


def _migrate_and_compare(make_theirs, ours_kwargs: dict) -> None:
    """Run theirs 6 steps, save; continue theirs 6 more; load the save into ours and continue 6 more."""
    theirs_model = _model()
    theirs = make_theirs(theirs_model.parameters())
    _train(theirs_model, theirs, 0, 6)
    buf = io.BytesIO()
    torch.save({"model": theirs_model.state_dict(), "opt": theirs.state_dict()}, buf)
    _train(theirs_model, theirs, 6, 12)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ours_model = _model()
    ours_model.load_state_dict(saved["model"])
    ours = adoptim.ADOPT(ours_model.parameters(), foreach=False, **ours_kwargs)
    ours.load_state_dict(saved["opt"])
    _train(ours_model, ours, 6, 12)
    # Same operations in the same order: the migrated run continues bit for bit.
    for a, b in zip(theirs_model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[b][key], theirs.state[a][key], rtol=0, atol=0)
    return ours


# The ports' default (foreach=None) is their for-loop kernel on the CPU; adoptim's foreach=False is the
# same operations, so the continuation is exact. The saved foreach=None must not replace the loading
# optimizer's choice (in adoptim it would mean the fused kernel).
@pytest.mark.parametrize("their_kernel", [{}, {"foreach": False}], ids=["their-default", "their-forloop"])
@pytest.mark.parametrize("decouple", [False, True])
def test_torch_adopt_checkpoint_continues_exactly(decouple: bool, their_kernel: dict) -> None:
    official = _official()
    ours = _migrate_and_compare(
        lambda ps: official(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, decouple=decouple, **their_kernel),
        {},
    )
    group = ours.param_groups[0]
    assert group["decoupled_weight_decay"] is decouple and group["clip_exponent"] == 0.25
    assert "decouple" not in group and not group.get("fused")


@pytest.mark.parametrize("their_kernel", [{}, {"foreach": False}], ids=["their-default", "their-forloop"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("clip_exp", [0.333, None])
def test_timm_adopt_checkpoint_continues_exactly(decoupled: bool, clip_exp: float | None, their_kernel: dict) -> None:
    timm_adopt = _timm_adopt()
    ours = _migrate_and_compare(
        lambda ps: timm_adopt(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, decoupled=decoupled,
                              clip_exp=clip_exp, **their_kernel),
        {},
    )
    group = ours.param_groups[0]
    assert group["decoupled_weight_decay"] is decoupled and group["clip_exponent"] == clip_exp
    assert not {"decoupled", "clip_exp", "caution", "corrected_weight_decay", "max_lr_snapshot"} & set(group)


def test_timm_state_with_features_adoptim_lacks_is_refused() -> None:
    timm_adopt = _timm_adopt()
    model = _model()
    theirs = timm_adopt(model.parameters(), caution=True)
    _train(model, theirs, 0, 2)
    ours = adoptim.ADOPT(model.parameters())
    with pytest.raises(ValueError, match=r"caution=True"):
        ours.load_state_dict(theirs.state_dict())
    assert len(ours.state) == 0


def test_another_ports_kernel_choice_leaves_the_loading_optimizers_own() -> None:
    # timm saved with foreach=True, loaded into ADOPT(fused=True): the group keeps fused=True (no
    # foreach=True beside it, which every step would refuse) and continues close to timm's run.
    timm_adopt = _timm_adopt()
    model = _model()
    theirs = timm_adopt(model.parameters(), lr=0.01, foreach=True)
    _train(model, theirs, 0, 3)
    ours_model = copy.deepcopy(model)
    ours = adoptim.ADOPT(ours_model.parameters(), lr=0.01, fused=True)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as from a file: no tensors shared with timm's
    group = ours.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    _train(model, theirs, 3, 6)
    _train(ours_model, ours, 3, 6)
    for a, b in zip(model.parameters(), ours_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # another kernel: float32 rounding apart


def test_a_torch_adopt_group_keeps_the_loading_groups_clip_exponent() -> None:
    # torch-adopt saves no clip rule; each group takes that of the loading optimizer's group at the same
    # position, not the constructor default.
    official = _official()
    model = _model()
    layers = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    theirs = official(layers, lr=0.01)
    _train(model, theirs, 0, 2)
    ours = adoptim.ADOPT([{"params": model[0].parameters(), "clip_exponent": None},
                          {"params": model[2].parameters()}], lr=0.01, clip_exponent=0.5)
    ours.load_state_dict(theirs.state_dict())
    assert [g["clip_exponent"] for g in ours.param_groups] == [None, 0.5]


def test_adam_state_is_refused() -> None:
    # Same state names, other meaning: Adam's exp_avg is a momentum of raw gradients.
    model = _model()
    adam = torch.optim.AdamW(model.parameters())
    _train(model, adam, 0, 2)
    ours = adoptim.ADOPT(model.parameters())
    with pytest.raises(ValueError, match="Adam or AdamW"):
        ours.load_state_dict(adam.state_dict())
    assert len(ours.state) == 0
