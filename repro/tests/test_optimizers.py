"""The low-precision variants ``adopt-8bit`` and ``adopt-bf16``: ADOPT with its moments stored in 8 bits or
bfloat16, everything else as ``adopt``, selectable wherever an experiment takes optimizer names."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adoptim import ADOPT
from adoptim_repro import registry
from adoptim_repro.config import field_help, resolve
from adoptim_repro.optimizers import OPTIMIZERS, OptimSpec, default_specs, make_optimizer
from repro_helpers import run_cli, tiny_mnist

VARIANTS = {"adopt-8bit": "8bit", "adopt-bf16": "bfloat16"}
N = 8192  # above the library's default state_min_size (4096): this tensor's state is low-precision


def _stepped(name: str, spec: OptimSpec, steps: int = 3) -> tuple[torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.randn(N, generator=gen))
    bias = torch.nn.Parameter(torch.zeros(8))
    opt = make_optimizer(name, [big, bias], spec)
    for _ in range(steps):
        big.grad = torch.randn(N, generator=gen)
        bias.grad = torch.randn(8, generator=gen)
        opt.step()
    return opt, big, bias


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_is_adopt_with_its_state_precision_and_nothing_else_changed(name):
    spec = OptimSpec(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    p = [torch.nn.Parameter(torch.ones(1))]
    opt, adopt = make_optimizer(name, p, spec), make_optimizer("adopt", p, spec)
    assert type(opt) is ADOPT
    assert opt.defaults == {**adopt.defaults, "state_precision": VARIANTS[name]}
    assert opt.defaults["state_block_size"] == 256 and opt.defaults["state_min_size"] == 4096
    assert adopt.defaults["state_precision"] == "full"


def test_8bit_variant_stores_codes_and_one_scale_per_block_and_leaves_small_tensors_full():
    opt, big, bias = _stepped("adopt-8bit", OptimSpec(betas=(0.9, 0.9999), eps=1e-6))
    state = opt.state[big]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].dtype == torch.uint8 and state[key].shape == (N,)
        assert state[key + "_absmax"].dtype == torch.float32 and state[key + "_absmax"].shape == (N // 256,)
    nbytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("exp_avg"))
    assert nbytes == 2 * (N + 4 * N // 256)  # 2.03 bytes per element, against 8 for float32 moments
    assert opt.state[bias]["exp_avg"].dtype == torch.float32 and opt.state[bias]["exp_avg"].shape == (8,)


def test_bf16_variant_stores_bfloat16_moments_within_one_ulp_of_adopts():
    spec = OptimSpec(betas=(0.9, 0.9999), eps=1e-6)
    low, big, _ = _stepped("adopt-bf16", spec, steps=1)
    full, big32, _ = _stepped("adopt", spec, steps=1)
    v = low.state[big]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16 and v.shape == (N,)
    # After the first step v = g^2 (the same gradients, no update yet), rounded once to bfloat16:
    # stochastic rounding lands on one of the two neighbours, so within one ulp (2^-7 relative).
    v32 = full.state[big32]["exp_avg_sq"].reshape(-1)
    assert torch.all((v.float() - v32).abs() <= v32 * 2.0**-7)
    torch.testing.assert_close(big.detach(), big32.detach(), rtol=0, atol=0)  # the first step moves nothing


def test_an_unknown_name_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as err:
        make_optimizer("adopt-4bit", [torch.nn.Parameter(torch.ones(1))], OptimSpec())
    message = str(err.value)
    assert "\n" not in message and message.startswith("unknown optimizer 'adopt-4bit'; known: ")
    assert message.split("known: ")[1].split(", ") == list(OPTIMIZERS)
    assert {"adopt-8bit", "adopt-bf16"} <= set(OPTIMIZERS)


def test_an_unknown_name_on_the_command_line_is_one_line_naming_the_variants(tmp_path, capsys):
    assert run_cli("vae", "--set", "optimizers=adopt,adopt-4bit", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown optimizer 'adopt-4bit' in 'optimizers'" in err
    assert "adopt-8bit, adopt-bf16" in err
    assert not (tmp_path / "out").exists()


def test_the_variants_take_adopts_settings_in_each_experiment_and_can_be_set_apart():
    assert default_specs(adopt=OptimSpec(lr=5e-3))["adopt-8bit"].lr == 5e-3
    assert default_specs(adopt=OptimSpec(lr=5e-3), **{"adopt-bf16": OptimSpec(lr=1e-4)})["adopt-bf16"].lr == 1e-4
    checked = 0
    for name, exp in registry.available().items():
        if isinstance(exp, Exception):
            continue
        runs = getattr(exp.config, "OPTIMIZERS", OPTIMIZERS)  # toy runs only the rules it writes out
        if "optim" not in field_help(exp.config) or "adopt-8bit" not in runs:
            continue
        cfg = exp.config()
        for variant in VARIANTS:
            assert cfg.optim[variant] == cfg.optim["adopt"], (name, variant)
        # Every optimizer name the suite knows is in the help text of the experiment's 'optimizers' key.
        assert all(n in field_help(exp.config)["optimizers"] for n in OPTIMIZERS), name
        checked += 1
    assert checked >= 3  # mnist, vae, gpt at least
    from adoptim_repro import vae

    cfg = resolve(vae.VaeConfig, [("optimizers", "adopt,adopt-8bit"), ("adopt-8bit.lr", "2e-3")], validate=False)
    assert cfg.optimizers == ("adopt", "adopt-8bit") and cfg.optim["adopt-8bit"].lr == 2e-3
    assert cfg.optim["adopt"].lr == 1e-3


def test_vae_runs_with_the_variants_beside_adopt(tmp_path):
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    assert run_cli("vae", "--quick", "--seeds", "1", "--set", "steps=20", "channels=4", "batch_size=32",
                   "eval_every=10", "log_every=10", f"data_dir={data}", "optimizers=adopt,adopt-8bit,adopt-bf16",
                   "--out", out) == 0
    rows = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["final"]}
    assert set(rows) == {"adopt", "adopt-8bit", "adopt-bf16"}
    for r in rows.values():
        assert 0 < r["test_nelbo_mean"] < 784 * math.log(2)  # below the cost of coin-flip pixels
