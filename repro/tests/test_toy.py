"""The toy problem: the oracle is unbiased, the vectorised rules are the real optimizers, files appear."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from adoptim import ADOPT
from adoptim_repro import toy
from adoptim_repro.config import resolve
from repro_helpers import run_cli


def _cfg(**kw):
    return resolve(toy.ToyConfig, [(k, v) for k, v in kw.items()])


@pytest.mark.parametrize("k", [10, 50])
def test_oracle_takes_two_values_with_probability_one_over_k_and_mean_one(k):
    cfg = _cfg(ks=(k,), runs=1000, dtype="float64")
    g = torch.cat([toy.draws(cfg, seed=0, chunk=c, length=1000)[0] for c in range(2)]).flatten()
    big = g == k * k
    assert bool((big | (g == -k)).all())
    n, p = g.numel(), 1 / k
    freq = big.double().mean().item()
    assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n)
    # The oracle is f_t(x) = g_t x, so its mean is f(x) = x exactly when E[g] = k^2/k - k(1 - 1/k) = 1;
    # the sample mean agrees within sampling error.
    assert k * k * p - k * (1 - p) == pytest.approx(1.0)
    sd = math.sqrt(k**4 * p + k * k * (1 - p) - 1)
    assert abs(g.mean().item() - 1.0) < 5 * sd / math.sqrt(n)


def test_draws_depend_only_on_seed_and_chunk():
    cfg = _cfg(runs=7)
    a, b = toy.draws(cfg, 3, 5, 11)[0], toy.draws(cfg, 3, 5, 11)[0]
    assert torch.equal(a, b) and not torch.equal(a, toy.draws(cfg, 4, 5, 11)[0])


def _real(name: str, x: torch.Tensor, beta1: float, beta2: float, eps: float, clip: float):
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam([x], lr=1.0, betas=(beta1, beta2), eps=eps, amsgrad=name == "amsgrad",
                                foreach=False)
    return ADOPT([x], lr=1.0, betas=(beta1, beta2), eps=eps, clip_exponent=clip if name == "adopt" else None,
                 foreach=False)


@pytest.mark.parametrize("name", toy.TOY_OPTIMIZERS)
def test_vectorised_rules_match_the_real_optimizer_classes(name):
    # Small eps and short chunks/blocks exercise the bias tables, the ADOPT first call and block edges.
    cfg = _cfg(steps=150, runs=6, ks=(3, 10), beta2s=(0.1, 0.9), dtype="float64", compile=False, chunk=64,
               clip_exponent=0.25, lr_decay=0.01)
    runs = toy._Runs(cfg, name)
    spec = cfg.optim[name]
    chunks = [toy.draws(cfg, 0, c, min(cfg.chunk, cfg.steps - c * cfg.chunk)) for c in range(3)]
    for c, (g, g2) in enumerate(chunks):
        runs.advance(g[:40], g2[:40], c * cfg.chunk)
        runs.advance(g[40:], g2[40:], c * cfg.chunk + 40)
    for a in range(len(cfg.ks)):
        for b, beta2 in enumerate(cfg.beta2s):
            x = torch.zeros(cfg.runs, dtype=torch.float64, requires_grad=True)
            opt = _real(name, x, spec.betas[0], beta2, spec.eps, cfg.clip_exponent)
            for t in range(cfg.steps):
                c, i = divmod(t, cfg.chunk)
                x.grad = chunks[c][0][i, a, 0].clone()
                opt.param_groups[0]["lr"] = spec.lr / math.sqrt(1 + cfg.lr_decay * t)
                opt.step()
                with torch.no_grad():
                    x.clamp_(-1.0, 1.0)
            torch.testing.assert_close(runs.x[a, b], x.detach(), rtol=1e-10, atol=1e-12)
            assert not torch.equal(x.detach(), torch.zeros_like(x))


def test_quick_path_at_tiny_size_writes_all_files(tmp_path):
    out = tmp_path / "toy"
    assert run_cli("toy", "--quick", "--set", "steps=300", "--set", "runs=16", "--set", "log_points=10",
                   "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "toy" and summary["config"]["steps"] == 300
    assert len(summary["final"]) == 4 * 2 * 3
    for row in summary["final"]:
        assert {"optimizer", "k", "beta2", "median", "q25", "q75"} <= set(row)
        assert -1 <= row["q25"] <= row["median"] <= row["q75"] <= 1
    assert json.loads((out / "config.json").read_text())["config"]["runs"] == 16
    assert (out / "toy.png").stat().st_size > 1000
    assert "| adopt-noclip | 50 | 0.999 |" in (out / "summary.md").read_text()
    for name in toy.TOY_OPTIMIZERS:
        lines = (out / "metrics" / f"{name}-s0.jsonl").read_text().splitlines()
        assert [json.loads(s)["step"] for s in lines] == list(range(30, 301, 30))
        assert (out / "runs" / f"{name}-s0.json").exists()
    assert not list(out.glob("checkpoints/*"))  # removed once their unit finished


def test_adam_with_small_beta2_goes_to_the_wrong_end_and_adopt_does_not(tmp_path):
    # The paper's Figure 1 in miniature: k = 10, beta2 = 0.1, 20k steps, 64 runs.
    out = tmp_path / "toy"
    assert run_cli("toy", "--set", "steps=20000", "--set", "runs=64", "--set", "ks=10", "--set", "beta2s=0.1",
                   "--set", "optimizers=adam,adopt-noclip", "--set", "compile=false", "--out", out) == 0
    final = {r["optimizer"]: r for r in json.loads((out / "summary.json").read_text())["final"]}
    assert final["adam"]["median"] > 0.9
    assert final["adopt-noclip"]["median"] < -0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["amsgrad", "adopt"])
def test_compiled_blocks_match_the_eager_rules(name):
    # The README's numbers come from the compiled path: it must be the same arithmetic as the tested one.
    kw = dict(steps=40, runs=4, ks=(10,), beta2s=(0.1, 0.999), dtype="float64", chunk=1000)
    eager, fast = toy._Runs(_cfg(compile=False, **kw), name), toy._Runs(_cfg(compile=True, **kw), name)
    g, g2 = toy.draws(_cfg(**kw), 0, 0, kw["steps"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for runs in (eager, fast):
            runs.block = 4  # a short block compiles in seconds; the arithmetic per call is the same
            runs.advance(g, g2, 0)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)], "compiling fell back to eager"
    torch.testing.assert_close(fast.x, eager.x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.m, eager.m, rtol=1e-12, atol=1e-12)
