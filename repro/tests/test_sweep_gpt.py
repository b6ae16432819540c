"""``adoptim sweep gpt``: a seed of a cell is the gpt experiment's run, the grid's errors, the spike count
against hand-made loss curves, the page's spike sentences, and resuming after a kill."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adoptim_repro import sweep, sweep_report
from adoptim_repro.sweep import Cell, GptSweepConfig
from repro_helpers import kill_then_resume, run_cli

TINY = {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, "eval_seqs": 8, "warmup": 4, "spike_window": 10}


def _tiny(*sets: str) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in TINY.items()), "steps=12", "seeds=2", *sets]


@pytest.mark.parametrize("setting, words", [
    ("beta2s=0.9,1.0", "'beta2s': every value must be in [0, 1), got 1.0"),
    ("lrs=2e-3,0", "'lrs': every value must be a finite number > 0, got 0.0"),
    ("lrs=2e-3,2e-3", "'lrs' lists a value twice"),
    ("optimizers=adamax", "this experiment runs only adam, amsgrad, adopt, adamw, adoptw, not 'adamax'"),
    ("batch_size=0", "'batch_size' must be >= 1, got 0"),
    ("n_embd=31", "'n_embd' (31) must be a multiple of n_head (2)"),
    ("spike_factor=1", "'spike_factor' must be > 1, got 1.0"),
    ("grad_clip=-1", "'grad_clip' must be a finite number >= 0, got -1.0"),
])
def test_a_bad_gpt_grid_is_one_line_before_anything_runs(setting: str, words: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli("sweep", "gpt", "--out", out, *_tiny(setting)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adoptim: error: ") and words in err, err
    assert not out.exists()


def test_a_tiny_gpt_sweep_runs_through_the_command_and_writes_its_page(tmp_path: Path) -> None:
    small, large = tmp_path / "b2", tmp_path / "b4"
    page = tmp_path / "docs" / "reproduction" / "sweeps_gpt.md"
    assert run_cli("sweep", "gpt", "--out", large, *_tiny("batch_size=4", "beta2s=0.9", "lrs=2e-3",
                                                          "optimizers=adam,adopt", "ensemble=false")) == 0
    assert run_cli("sweep", "gpt", "--cost", "--out", large, *_tiny("batch_size=4", "ensemble=false")) == 0
    assert run_cli("sweep", "gpt", "--out", small, "--doc", page, "--doc-batch", large,
                   *_tiny("beta2s=0.5,0.99", "lrs=2e-3,2e-2", "optimizers=adam,adopt,adamw")) == 0
    summary = json.loads((small / "summary.json").read_text())
    assert summary["experiment"] == "sweep-gpt" and len(summary["final"]) == 12
    records = [r for p in (small / "runs").glob("*.json") for r in json.loads(p.read_text())["records"]]
    assert len(records) == 24
    for r in records:  # an untrained byte model predicts about uniformly: ln 256 nats per byte
        assert r["init_loss"] == pytest.approx(math.log(256), abs=0.05)
        assert r["test_accuracy"] is None and r["diverged_step"] is None and isinstance(r["spikes"], int)
    rows = {(r["optimizer"], r["beta2"]): r for r in summary["spikes"]}
    assert len(rows) == 6 and all(r["runs"] == 4 for r in rows.values())  # 2 lrs x 2 seeds
    a = rows[("adam", 0.5)]
    want = [r["spikes"] for r in records if r["optimizer"] == "adam" and r["beta2"] == 0.5]
    assert a["spiked"] == sum(n > 0 for n in want) and a["mean"] == pytest.approx(sum(want) / 4)
    text = page.read_text()
    assert "### Loss spikes, over beta2, at a small and a large batch" in text
    assert "Batch 2 (12 steps, lrs 0.002, 0.02):" in text and "Batch 4 (12 steps, lrs 0.002):" in text
    assert "--set batch_size=4" in text and "--set ensemble=false" in text and f"--out {large.as_posix()}" in text
    assert text.index("### Loss spikes") < text.index("\n## Cost\n")  # the Cost section stays the last
    assert "held-out loss (nats per byte)" in text and "1 layers, 32 wide" in text
    cost = text.partition("\n## Cost\n")[2]  # both sweeps' time; the measured one's command has its batch
    assert "The batch 4 sweep: 2 cells, 4 seed runs of 12 steps" in cost and "seeds one after another" in cost
    measured = json.loads((large / "cost.json").read_text())
    assert (f"`adoptim sweep gpt --cost --threads {measured['threads']} --set batch_size=4 --set steps=12`: one cell's "
            f"2 seeds (batch 4, cpu) take {measured['ms_per_seed_step']['ensemble']:g} ms") in cost


def test_doc_batch_wants_another_batch_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    grid = _tiny("beta2s=0.9", "lrs=2e-3", "optimizers=adopt", "steps=3")
    assert run_cli("sweep", "gpt", "--out", out, *grid) == 0
    capsys.readouterr()
    assert run_cli("sweep", "gpt", "--out", out, "--doc", tmp_path / "page.md", "--doc-batch", out, *grid) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "that sweep is at batch 2 too; it must be at another batch size" in err, err
    assert run_cli("sweep", "gpt", "--out", tmp_path / "new", "--doc", tmp_path / "page.md", "--doc-batch",
                   tmp_path / "none", *grid) == 2
    assert "no summary.json there; finish that sweep first" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before anything ran


def test_a_batched_seed_is_the_gpt_experiments_run_alone(tmp_path: Path) -> None:
    # The gpt experiment run by `adoptim gpt` for seed 0 (its init, batches, warm-up and cosine, clipping,
    # nanoGPT's decay groups) is seed 0 of the sweep's cell, batched with a second seed or not. The
    # sums differ in order only (the ensemble's batched products, the loss as a mean rather than a sum
    # times 1/tokens, the clip norm in float64), a few float32 ulps a step; after 30 steps the losses
    # differ by about 1e-7 relative (measured), so 1e-5 leaves room and still fails at once for another
    # seed or setting (seed 1 differs by more than 1e-3 absolute, 3e-4 relative).
    out = tmp_path / "gpt"
    assert run_cli("gpt", "--out", out, "--set", "seeds=1", "optimizers=adamw,adoptw", "adamw.lr=1e-2",
                   "adamw.betas=0.9,0.5", "adoptw.lr=1e-2", "adoptw.betas=0.9,0.5", "batch_sizes=2", "steps=30",
                   "warmup=4", "block_size=32", "n_layer=1", "n_head=2", "n_embd=32", "eval_every=30",
                   "eval_seqs=8", "final_window=30", "spike_window=10") == 0
    cfg = GptSweepConfig(steps=30, seeds=2, **TINY)
    for opt in ("adamw", "adoptw"):
        alone = json.loads((out / "runs" / f"{opt}-s0-batch2.json").read_text())["records"][0]
        got = []
        for batched in (True, False):
            cfg.ensemble = batched
            (mine, other), _ = sweep.train_cell(sweep.GPT, cfg, Cell(opt, 0.5, 1e-2))
            assert mine["test_loss"] == pytest.approx(alone["val_loss"], rel=1e-5), (opt, batched)
            assert mine["train_loss"] == pytest.approx(alone["final_train_loss"], rel=1e-5), (opt, batched)
            assert mine["spikes"] == alone["spikes"] and mine["spike_steps"] == alone["spike_steps"]
            assert abs(other["test_loss"] - mine["test_loss"]) > 1e-3  # seed 1 is another run
            got.append(mine["test_loss"])
        assert got[0] == pytest.approx(got[1], rel=1e-5)


def test_the_ensemble_clips_each_members_gradient_as_torch_clips_it_alone() -> None:
    torch.manual_seed(0)
    members = [nn.Linear(3, 4) for _ in range(3)]
    scales = (0.01, 1.0, 30.0)  # member 0's norm is below the threshold: left unscaled
    for m, s in zip(members, scales, strict=True):
        for p in m.parameters():
            p.grad = torch.randn_like(p) * s
    stacked = [torch.stack([m.weight for m in members]), torch.stack([m.bias for m in members])]
    for sp, name in zip(stacked, ("weight", "bias"), strict=True):
        sp.grad = torch.stack([getattr(m, name).grad for m in members]).clone()
    sweep._clip_stacked(stacked, 0.5, 3)
    for k, m in enumerate(members):
        nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        assert torch.allclose(stacked[0].grad[k], m.weight.grad, rtol=1e-6, atol=0)
        assert torch.allclose(stacked[1].grad[k], m.bias.grad, rtol=1e-6, atol=0)
    assert stacked[0].grad[0].abs().max() < 0.1  # member 0 kept its small gradient


def test_spikes_are_counted_as_the_gpt_experiment_counts_them() -> None:
    # 100 steps at loss 2.0 (window 10, factor 1.5: a spike is a loss above 3.0): a rise to 3.5 over steps
    # 40-42 counts once, at step 40; 2.9 at step 60 is below 3.0; 3.01 at step 70 and inf at 90 are spikes.
    # The largest finite ratio to the median before it is 3.5 / 2.0 (the window's median stays 2.0).
    losses = [2.0] * 100
    losses[40:43] = [3.5, 3.5, 3.5]
    losses[60], losses[70], losses[90] = 2.9, 3.01, math.inf
    cfg = GptSweepConfig(spike_factor=1.5, spike_window=10)
    got = sweep._gpt_per_seed(cfg, losses)
    assert got == {"spikes": 3, "spike_steps": [40, 70, 90], "peak_ratio": pytest.approx(1.75)}
    assert sweep._gpt_per_seed(cfg, [2.0] * 10)["spikes"] == 0  # shorter than the window: no median yet
    assert sweep._gpt_per_seed(GptSweepConfig(spike_factor=1.2, spike_window=10), losses)["spikes"] == 4  # 2.9 too


def _summary(batch: int, spiked: dict[str, int], runs: int = 10) -> dict:
    rows = [{"optimizer": o, "beta2": 0.9, "runs": runs, "spiked": n, "mean": n / runs, "ci95": 0.1, "diverged": 0,
             "peak_ratio": 2.0 if n else 1.1, "peak_lr": 0.02} for o, n in spiked.items()]
    return {"config": {"batch_size": batch, "spike_factor": 1.5, "optimizers": list(spiked), "beta2s": [0.9]},
            "spikes": rows}


def test_the_spike_sentences_come_from_the_numbers() -> None:
    calm = [_summary(2, {"adam": 0, "adopt": 0}), _summary(16, {"adam": 0, "adopt": 0})]
    text = "\n".join(sweep_report._spike_verdicts(calm))
    assert "Batch 2, Adam (adam): 0 of 10 seed runs spiked; the largest loss over its running median is 1.1x" in text
    assert ("No regime of these grids makes Adam spike at this scale: 0 of its 20 seed runs at batch 2 and 16 "
            "exceed 1.5x the running median") in text
    rough = [_summary(2, {"adam": 3, "adamw": 1, "adopt": 0})]
    text = "\n".join(sweep_report._spike_verdicts(rough))
    assert "Batch 2, Adam (adam, adamw): 4 of 20 seed runs spiked, at beta2 0.9 (adam, 3/10); beta2 0.9 (adamw, 1/10)" \
        in text
    assert "Batch 2, ADOPT (adopt): 0 of 10 seed runs spiked" in text and "No regime" not in text


@pytest.mark.slow
def test_a_killed_gpt_sweep_resumes_without_repeating_finished_cells(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "adoptim_repro", "sweep", "gpt", "--out", str(out), "--threads", "1",
           *_tiny("optimizers=adam,adopt", "beta2s=0.5,0.9,0.99", "lrs=2e-3,2e-2", "steps=40")]
    kill_then_resume(cmd, out, 12)
