"""MNIST and VAE experiments at tiny size on a synthetic IDX set: they learn and write all their files."""

from __future__ import annotations

import json
import math

from adoptim_repro import vae
from repro_helpers import run_cli, tiny_mnist


def _files(out, name):
    assert (out / f"{name}.png").stat().st_size > 1000
    assert (out / "summary.md").read_text().startswith(f"# {name}")
    assert json.loads((out / "config.json").read_text())["experiment"] == name
    return json.loads((out / "summary.json").read_text())


def test_mnist_quick_at_tiny_size_learns_and_writes_all_files(tmp_path):
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    assert run_cli("mnist", "--quick", "--set", "steps=60", "--set", "hidden=32", "--set", "batch_size=32",
                   "--set", "eval_every=30", "--set", "log_every=10", "--set", f"data_dir={data}",
                   "--set", "adam.lr=1e-2", "--set", "amsgrad.lr=1e-2", "--set", "adopt.lr=1e-2",
                   "--out", out) == 0
    summary = _files(out, "mnist")
    rows = {r["optimizer"]: r for r in summary["final"]}
    assert set(rows) == {"adam", "amsgrad", "adopt"}
    for r in rows.values():
        assert r["seeds"] == 2 and r["ci95"] >= 0
        assert r["test_accuracy_%"] > 50  # chance is 10% on this separable set
        assert r["train_loss_final"] < math.log(10)
    lines = [json.loads(s) for s in (out / "metrics" / "adopt-s1.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30, 40, 50, 60]
    assert "test_accuracy" in lines[2] and "test_accuracy" not in lines[1]


def test_vae_quick_at_tiny_size_improves_the_elbo_and_writes_all_files(tmp_path):
    data, out = tiny_mnist(tmp_path / "data"), tmp_path / "out"
    assert run_cli("vae", "--quick", "--set", "steps=40", "--set", "channels=4", "--set", "batch_size=32",
                   "--set", "eval_every=20", "--set", "log_every=10", "--set", f"data_dir={data}",
                   "--out", out) == 0
    summary = _files(out, "vae")
    assert [r["optimizer"] for r in summary["final"]] == ["adamax", "adopt"]
    for r in summary["final"]:
        assert r["test_nelbo_min"] <= r["test_nelbo_mean"] <= r["test_nelbo_max"]
        # 784 Bernoulli pixels at p = 1/2 cost 784 ln 2 = 543 nats: training must beat that.
        assert 0 < r["test_nelbo_mean"] < 784 * math.log(2)


def test_vae_negative_elbo_matches_a_closed_form():
    import torch

    model = vae.ConvVAE(latent=3, ch=2)
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    # All weights zero: q(z|x) = N(0, I) so KL = 0, logits 0 so every pixel costs ln 2.
    x = (torch.rand(5, 1, 28, 28) > 0.5).float()
    torch.testing.assert_close(model(x, torch.randn(5, 3)), torch.full((5,), 784 * math.log(2)))
