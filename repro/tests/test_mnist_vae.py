"""MNIST and VAE experiments at tiny size on a synthetic IDX set: they learn and write all their files."""

from __future__ import annotations

import json
import math

import pytest

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
    # The two seeds trained as one ensemble: each metric line holds a list over the seeds.
    lines = [json.loads(s) for s in (out / "metrics" / "adopt-s0-seeds2.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30, 40, 50, 60]
    assert "test_accuracy" in lines[2] and "test_accuracy" not in lines[1]
    assert all(len(x["train_loss"]) == 2 for x in lines) and len(lines[2]["test_accuracy"]) == 2


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


# --------------------------------------------------------------------------- seeds trained as one ensemble
# Tiny configs: every optimizer each experiment lists, 3 seeds, a few evaluations. mnist's lr is alpha/sqrt(t).
TINY = {
    "mnist": ["--set", "steps=40", "--set", "hidden=32", "--set", "batch_size=32", "--set", "eval_every=20",
              "--set", "log_every=10", "--set", "seeds=3", "--set", "adam.lr=1e-2", "--set", "amsgrad.lr=1e-2",
              "--set", "adopt.lr=1e-2"],
    "vae": ["--set", "steps=30", "--set", "channels=4", "--set", "batch_size=32", "--set", "eval_every=15",
            "--set", "log_every=5", "--set", "seeds=3"],
}
METRICS = {"mnist": ("test_accuracy", "train_loss_final"), "vae": ("test_nelbo", "train_nelbo_final")}


def _records(out):
    return {(r["optimizer"], r["seed"]): r for p in sorted((out / "runs").glob("*.json"))
            for r in json.loads(p.read_text())["records"]}


@pytest.mark.parametrize("name", ["mnist", "vae"])
def test_member_k_of_the_ensemble_equals_seed_k_trained_alone(tmp_path, name):
    from adoptim_repro.ensemble import seed_histories
    from adoptim_repro.runner import RunResult, Unit

    data = tiny_mnist(tmp_path / "data")
    outs = {e: tmp_path / e for e in ("true", "false")}
    for e, out in outs.items():
        assert run_cli(name, *TINY[name], "--set", f"data_dir={data}", "--set", f"ensemble={e}", "--out", out) == 0
    ens, alone = _records(outs["true"]), _records(outs["false"])
    optimizers = {"mnist": {"adam", "amsgrad", "adopt"}, "vae": {"adamax", "adopt"}}[name]
    assert set(ens) == set(alone) == {(o, s) for o in optimizers for s in range(3)}
    assert sorted(p.name for p in (outs["true"] / "runs").glob("*.json")) == \
        sorted(f"{o}-s0-seeds3.json" for o in optimizers)  # one unit (one optimizer call per step) per optimizer
    # The ensemble's batched matrix products (and its float64 sum of the test loss) may add a dot
    # product's float32 terms in another order than the run alone: a few ulps per step, carried through
    # the optimizer. Measured on these configs: at most 1.0e-7 relative (mnist's training loss; the vae's
    # -ELBO 6e-8, 3e-5 nats of ~500), test accuracies equal. The bound, 1e-6, is 10x that; a mixed-up member
    # or a gradient summed over members changes them by 1e-2 relative or more (the seeds differ by more).
    for key, r in alone.items():
        for metric in METRICS[name]:
            assert ens[key][metric] == pytest.approx(r[metric], rel=1e-6, abs=0), (key, metric)
    # The metric histories too, seed by seed: the ensemble's list over seeds split as the plots split it.
    def results(out):
        units = [json.loads(p.read_text())["unit"] for p in sorted((out / "runs").glob("*.json"))]
        units = [Unit(u["optimizer"], u["seed"], tuple(tuple(x) for x in u["setting"])) for u in units]
        return [RunResult(u, [], [json.loads(line) for line in (out / "metrics" / f"{u.key}.jsonl").open()])
                for u in units]
    hist = {e: seed_histories(results(out)) for e, out in outs.items()}
    for opt in optimizers:
        for k in range(3):
            a, b = hist["true"][opt][k], hist["false"][opt][k]
            assert [x["step"] for x in a] == [x["step"] for x in b]
            for x, y in zip(a, b, strict=True):
                assert x.keys() == y.keys()
                for m in x:
                    assert x[m] == pytest.approx(y[m], rel=1e-6, abs=0), (opt, k, m, x["step"])
    seeds = [ens[(o, s)][METRICS[name][0]] for o in optimizers for s in range(3)]
    assert max(seeds) - min(seeds) > 1e-2 * abs(max(seeds)) or name == "mnist"  # the runs differ
    summary = {e: json.loads((out / "summary.json").read_text())["final"] for e, out in outs.items()}
    assert [r["optimizer"] for r in summary["true"]] == [r["optimizer"] for r in summary["false"]]


class _Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["mnist", "vae"])
def test_an_ensemble_unit_killed_mid_way_resumes_bit_identically(tmp_path, monkeypatch, name):
    from adoptim_repro import registry
    from adoptim_repro.config import parse_set, resolve
    from adoptim_repro.runner import RunContext, run_experiment

    exp = registry.load(name)
    data = tiny_mnist(tmp_path / "data")
    sets = [a for a in TINY[name] if a != "--set"] + [f"data_dir={data}", "optimizers=adopt", "seeds=2"]
    cfg = resolve(exp.config, parse_set(sets))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_experiment(exp, cfg, whole, checkpoint_every=0, log=lambda s: None)
    real_log = RunContext.log
    logged = []

    def log_then_die(self, step, **metrics):  # killed after a metric line that has no checkpoint yet
        real_log(self, step, **metrics)
        logged.append(step)
        if len(logged) == 3:
            raise _Killed
    monkeypatch.setattr(RunContext, "log", log_then_die)
    with pytest.raises(_Killed):
        run_experiment(exp, cfg, resumed, checkpoint_every=0, log=lambda s: None)
    monkeypatch.setattr(RunContext, "log", real_log)
    assert list((resumed / "checkpoints").glob("*.pt")) and not (resumed / "summary.json").exists()
    said = []
    run_experiment(exp, cfg, resumed, checkpoint_every=0, log=said.append)
    assert json.loads((whole / "summary.json").read_text()) == json.loads((resumed / "summary.json").read_text())
    assert _records(whole) == _records(resumed)  # every seed's record, bit for bit
    for p in (whole / "metrics").glob("*.jsonl"):  # every metric line once, identical
        assert p.read_text() == (resumed / "metrics" / p.name).read_text()
