"""State written by the official torch-adopt package and by timm's Adopt loads and continues exactly."""

from __future__ import annotations

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
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(t))
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


@pytest.mark.parametrize("decouple", [False, True])
def test_torch_adopt_checkpoint_continues_exactly(decouple: bool) -> None:
    official = _official()
    ours = _migrate_and_compare(
        lambda ps: official(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, decouple=decouple, foreach=False),
        {},
    )
    group = ours.param_groups[0]
    assert group["decoupled_weight_decay"] is decouple and group["clip_exponent"] == 0.25
    assert "decouple" not in group and not group.get("fused")


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("clip_exp", [0.333, None])
def test_timm_adopt_checkpoint_continues_exactly(decoupled: bool, clip_exp: float | None) -> None:
    timm_adopt = _timm_adopt()
    ours = _migrate_and_compare(
        lambda ps: timm_adopt(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, decoupled=decoupled,
                              clip_exp=clip_exp, foreach=False),
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
