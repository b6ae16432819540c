"""``adoptim sweep``: the grid's errors, divergence, resuming after a kill, shards in two processes, and
the report's numbers against a hand computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adoptim_repro import sweep, sweep_report
from adoptim_repro.sweep import Cell, MnistSweepConfig, cells, summarize
from repro_helpers import kill_then_resume, run_cli, tiny_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mnist(tmp_path_factory.mktemp("mnist"))


def _tiny(data: Path, *sets: str) -> list[str]:
    return ["--set", f"data_dir={data}", "hidden=16", "batch_size=32", "steps=6", "seeds=2", *sets]


@pytest.mark.parametrize("setting, words", [
    ("beta2s=", "'beta2s' must list at least one value"),
    ("beta2s=0.9,1.0", "'beta2s': every value must be in [0, 1), got 1.0"),
    ("beta2s=-0.1", "'beta2s': every value must be in [0, 1), got -0.1"),
    ("lrs=", "'lrs' must list at least one value"),
    ("lrs=1e-3,0", "'lrs': every value must be a finite number > 0, got 0.0"),
    ("lrs=-1e-3", "'lrs': every value must be a finite number > 0, got -0.001"),
    ("lrs=1e-3,1e-3", "'lrs' lists a value twice"),
    ("optimizers=", "'optimizers' must list at least one optimizer"),
    ("optimizers=adamax", "this experiment runs only adam, amsgrad, adopt, adamw, adoptw, not 'adamax'"),
])
def test_a_bad_grid_is_one_line_before_anything_runs(setting: str, words: str, data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli("sweep", "mnist", "--out", out, *_tiny(data, setting)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adoptim: error: ") and words in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags, words", [
    (["--shard", "2/2"], "--shard expects i/n with 0 <= i < n"),
    (["--shard", "1"], "--shard expects i/n"),
    (["--shard", "0/2", "--fresh"], "--fresh with --shard would remove the other shards' results"),
])
def test_bad_shard_flags_are_one_line(flags: list[str], words: str, data: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert run_cli("sweep", "mnist", "--out", out, *flags, *_tiny(data)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not any(out.glob("runs/*"))


def _records(out: Path) -> dict[str, list[dict]]:
    return {p.stem: json.loads(p.read_text())["records"] for p in sorted((out / "runs").glob("*.json"))}


def test_a_diverged_seed_is_recorded_with_its_step_and_shown(data: Path, tmp_path: Path) -> None:
    # lr 1e30: Adam's first update moves every weight with a gradient by about 1e30, so the logits of the
    # second step overflow float32 and its loss is NaN or inf: step 2. ADOPT's first step only sets v, its
    # second update moves the weights: step 3. At lr 1e-3 nothing diverges.
    out, page = tmp_path / "out", tmp_path / "docs" / "reproduction" / "sweeps.md"
    assert run_cli("sweep", "mnist", "--out", out, "--doc", page,
                   *_tiny(data, "optimizers=adam,adopt", "beta2s=0.9", "lrs=1e-3,1e30")) == 0
    runs = _records(out)
    assert [r["diverged_step"] for r in runs["adam-b0.9-lr1e+30"]] == [2, 2]
    assert [r["diverged_step"] for r in runs["adopt-b0.9-lr1e+30"]] == [3, 3]
    for key in ("adam-b0.9-lr0.001", "adopt-b0.9-lr0.001"):
        assert all(r["diverged_step"] is None and r["test_loss"] < r["init_loss"] for r in runs[key])
    summary = json.loads((out / "summary.json").read_text())
    row = {(r["optimizer"], r["lr"]): r for r in summary["final"]}
    assert row[("adam", 1e30)]["diverged"] == 2 and row[("adam", 1e30)]["diverged_step"] == 2
    assert row[("adam", 1e30)]["test_loss"] is None and row[("adam", 1e-3)]["diverged"] == 0
    assert summary["best_lr"] == {"adam": 1e-3, "adopt": 1e-3}
    assert (out / "heatmaps.png").stat().st_size > 0 and (out / "beta2.png").stat().st_size > 0
    text = page.read_text()  # the docs page: the same numbers, and the figures beside it
    assert "- adam beta2 0.9 lr 1e+30: 2 of 2 seeds, first at step 2" in text
    assert "--set beta2s=0.9 --set lrs=0.001,1e+30 --set optimizers=adam,adopt --set seeds=2 --set steps=6" in text
    assert "- adopt beta2 0.9 lr 1e+30: 2 of 2 seeds, first at step 3" in text
    d = next(r for r in summary["paired"] if r["metric"] == "test loss at best lr")
    assert f"| 0.9 | test loss at best lr | {d['mean']:.3g} | [{d['lo']:.3g}, {d['hi']:.3g}] |" in text
    assert (page.parent.parent / "figures" / "sweep_mnist_heatmaps.png").read_bytes() == \
        (out / "heatmaps.png").read_bytes()


def test_the_ensemble_and_separate_runs_give_the_same_cell(data: Path, tmp_path: Path) -> None:
    # Both are seed s's own run (the test of Ensemble shows member k is its run alone); only the
    # summation order of the batched matrix products differs, a few float32 ulps.
    cfg = MnistSweepConfig(data_dir=str(data), hidden=16, batch_size=32, steps=20, seeds=3)
    got = {}
    for batched in (True, False):
        cfg.ensemble = batched
        got[batched], _ = sweep.train_mnist_cell(cfg, Cell("adopt", 0.5, 1e-2))
    for a, b in zip(got[True], got[False], strict=True):
        assert a["seed"] == b["seed"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
        assert a["init_loss"] == pytest.approx(b["init_loss"], rel=1e-6)
    assert len({r["test_loss"] for r in got[True]}) == 3  # the seeds are different runs


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adoptim_repro", "sweep", "mnist", "--out", str(out), "--threads", "1",
            *extra, *_tiny(data, "optimizers=adam,adopt", "beta2s=0.5,0.9,0.99", "lrs=1e-3,1e-2", "steps=60")]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_repeating_finished_cells(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    kill_then_resume(_cmd(data, out), out, 12)


@pytest.mark.slow
def test_two_shard_processes_share_one_out(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(data, out, "--shard", f"{i}/2"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    grid = cells(MnistSweepConfig(optimizers=("adam", "adopt"), beta2s=(0.5, 0.9, 0.99), lrs=(1e-3, 1e-2)))
    results = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert sorted(results) == sorted(c.key for c in grid)
    for i, cell in enumerate(grid):  # each cell ran once, in the shard that owns it
        assert results[cell.key]["shard"] == f"{i % 2}/2"
    assert len({results[c.key]["pid"] for c in grid}) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["final"]) == len(grid)
    assert not list(out.glob(".lock*"))
    assert sum("the one that finishes last writes the summary" in e for e in errs) <= 1


def _rec(o: str, lr: float, seed: int, loss: float | None, init: float = 2.0, div: int | None = None) -> dict:
    return {"optimizer": o, "beta2": 0.9, "lr": lr, "seed": seed, "test_loss": loss, "test_accuracy": 0.5,
            "train_loss": loss, "init_loss": init, "diverged_step": div}


def test_the_report_numbers_match_a_hand_computation() -> None:
    cfg = MnistSweepConfig(optimizers=("adam", "adopt"), beta2s=(0.9,), lrs=(1e-3, 1e-2, 1e-1), seeds=2)
    records = [
        # adam: seed 0 diverges at lr 0.1 (counts as the init loss 2.0); seed 1 ends above init there (2.5 -> 2.0)
        _rec("adam", 1e-3, 0, 0.5), _rec("adam", 1e-2, 0, 0.3), _rec("adam", 1e-1, 0, None, div=7),
        _rec("adam", 1e-3, 1, 0.7), _rec("adam", 1e-2, 1, 0.4), _rec("adam", 1e-1, 1, 2.5),
        _rec("adopt", 1e-3, 0, 0.4), _rec("adopt", 1e-2, 0, 0.35), _rec("adopt", 1e-1, 0, 0.6),
        _rec("adopt", 1e-3, 1, 0.5), _rec("adopt", 1e-2, 1, 0.45), _rec("adopt", 1e-1, 1, 1.0),
    ]
    s = summarize(cfg, records)
    assert s["best_lr"] == {"adam": 1e-2, "adopt": 1e-2}
    final = {(r["optimizer"], r["lr"]): r for r in s["final"]}
    assert final[("adam", 1e-1)]["diverged"] == 1 and final[("adam", 1e-1)]["diverged_step"] == 7
    assert final[("adam", 1e-1)]["test_loss"] == 2.5  # the mean over the seeds that did not diverge
    sens = {r["optimizer"]: r for r in s["sensitivity"]}
    # adam seed 0: mean(0.5, 0.3, 2.0) - 0.3 = 0.6333...; seed 1: mean(0.7, 0.4, 2.0) - 0.4 = 0.6333...
    assert sens["adam"]["mean"] == pytest.approx(2.8 / 3 - 0.3)
    # adopt seed 0: mean(0.4, 0.35, 0.6) - 0.35 = 0.1; seed 1: mean(0.5, 0.45, 1.0) - 0.45 = 0.2
    assert sens["adopt"]["mean"] == pytest.approx((0.1 + 0.2) / 2)
    paired = {r["metric"]: r for r in s["paired"]}
    # at the best lr 1e-2: differences 0.35 - 0.3 = 0.05 and 0.45 - 0.4 = 0.05, no spread
    assert paired["test loss at best lr"]["mean"] == pytest.approx(0.05)
    assert paired["test loss at best lr"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    d = [0.1 - (2.8 / 3 - 0.3), 0.2 - (3.1 / 3 - 0.4)]
    mean, half = sum(d) / 2, 12.706 * abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5  # t(1) * sd / sqrt(2)
    assert paired["lr sensitivity"]["mean"] == pytest.approx(mean)
    assert paired["lr sensitivity"]["ci95"] == pytest.approx(half)
    assert paired["lr sensitivity"]["excludes_zero"] is (abs(mean) > half)


def test_the_sweep_draws_the_mnist_experiments_batches() -> None:
    # The sweep keeps each seed's permutation of the epoch; the experiment draws it again every step.
    from adoptim_repro.mnist_data import batch_indices

    perms = sweep._Permutations(1000, 64)  # 15 batches an epoch, the last 40 images dropped
    for seed in (0, 3):
        for step in (0, 1, 14, 15, 16, 31, 45):
            assert torch.equal(perms(seed, step), batch_indices(1000, 64, seed, step)), (seed, step)


def test_a_seed_of_a_cell_is_the_mnist_experiments_run(data: Path, tmp_path: Path) -> None:
    # The same seed, beta2, lr, weight decay and alpha/sqrt(t) schedule through `adoptim mnist`: its
    # training loss over the 20 steps (one log window) and its test accuracy are the sweep's.
    out = tmp_path / "mnist"
    assert run_cli("mnist", "--out", out, "--set", f"data_dir={data}", "hidden=16", "batch_size=32", "steps=20",
                   "seeds=1", "ensemble=false", "optimizers=adopt", "adopt.lr=1e-2", "adopt.betas=0.9,0.5",
                   "eval_every=20", "log_every=20") == 0
    alone = json.loads((out / "runs" / "adopt-s0.json").read_text())["records"][0]
    cfg = MnistSweepConfig(data_dir=str(data), hidden=16, batch_size=32, steps=20, seeds=2)
    for batched in (True, False):
        cfg.ensemble = batched
        (mine, _), _ = sweep.train_mnist_cell(cfg, Cell("adopt", 0.5, 1e-2))
        assert mine["test_accuracy"] == alone["test_accuracy"]
        assert mine["train_loss"] == pytest.approx(alone["train_loss_final"], rel=1e-5)


def test_a_seed_of_a_vae_cell_is_the_vae_experiments_run(data: Path, tmp_path: Path) -> None:
    # The vae experiment's batches, reparameterisation noise, test noise and constant lr: its test
    # negative ELBO is the sweep's, batched (conv under vmap sums in another order: rel 1e-4) or not.
    out = tmp_path / "vae"
    assert run_cli("vae", "--out", out, "--set", f"data_dir={data}", "channels=4", "latent=4", "batch_size=32",
                   "steps=10", "seeds=1", "ensemble=false", "optimizers=adopt", "adopt.lr=1e-2", "adopt.betas=0.9,0.9",
                   "eval_every=10", "log_every=10") == 0
    alone = json.loads((out / "runs" / "adopt-s0.json").read_text())["records"][0]
    cfg = sweep.VaeSweepConfig(data_dir=str(data), channels=4, latent=4, batch_size=32, steps=10, seeds=2)
    got = []
    for batched in (True, False):
        cfg.ensemble = batched
        (mine, other), _ = sweep.train_cell(sweep.VAE, cfg, Cell("adopt", 0.9, 1e-2))
        assert mine["test_loss"] == pytest.approx(alone["test_nelbo"], rel=1e-4)
        assert mine["test_accuracy"] is None and other["test_loss"] != pytest.approx(mine["test_loss"], rel=1e-3)
        got.append(mine["test_loss"])
    assert got[0] == pytest.approx(got[1], rel=1e-4)


def test_a_vae_sweep_runs_through_the_command(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("sweep", "vae", "--out", out, "--set", f"data_dir={data}", "channels=4", "latent=4",
                   "batch_size=32", "steps=3", "seeds=2", "beta2s=0.5,0.99", "lrs=1e-3", "test_images=64") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "sweep-vae" and len(summary["final"]) == 6
    assert all(r["test_loss"] > 0 and r["test_accuracy_%"] is None for r in summary["final"])


def test_a_grown_grid_keeps_its_finished_cells_and_another_setting_is_refused(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    base = _tiny(data, "optimizers=adopt", "beta2s=0.9")
    assert run_cli("sweep", "mnist", "--out", out, *base, "lrs=1e-3") == 0
    first = (out / "runs" / "adopt-b0.9-lr0.001.json").read_text()
    assert run_cli("sweep", "mnist", "--out", out, *base, "lrs=1e-3,1e-2") == 0
    assert (out / "runs" / "adopt-b0.9-lr0.001.json").read_text() == first  # not trained again
    assert [r["lr"] for r in json.loads((out / "summary.json").read_text())["final"]] == [1e-3, 1e-2]
    capsys.readouterr()
    assert run_cli("sweep", "mnist", "--out", out, *base, "lrs=1e-3", "steps=7") == 2
    assert "was made with steps=6, not 7" in capsys.readouterr().err
    assert run_cli("sweep", "mnist", "--out", out, *base, "seeds=3", "lrs=1e-3") == 2
    assert "was made with seeds=2, not 3" in capsys.readouterr().err


def test_the_length_check_compares_the_rankings() -> None:
    def summary(steps: int, losses: dict) -> dict:
        final = [{"optimizer": o, "beta2": b, "lr": 0.03, "capped_loss": v} for (o, b), v in losses.items()]
        return {"experiment": "sweep-mnist", "final": final, "paired": [],
                "config": {"steps": steps, "beta2s": [0.5, 0.99], "lrs": [0.03], "optimizers": ["adam", "adopt"]}}

    short = summary(400, {("adam", 0.5): 0.2, ("adopt", 0.5): 0.1, ("adam", 0.99): 0.3, ("adopt", 0.99): 0.4})
    long = summary(2000, {("adam", 0.5): 0.09, ("adopt", 0.5): 0.05, ("adam", 0.99): 0.06, ("adopt", 0.99): 0.07,
                          ("amsgrad", 0.99): 0.01})  # not in the short sweep: left out
    text = "\n".join(sweep_report._length_check(short, long))
    assert "| 0.5 | 0.03 | adopt 0.1 < adam 0.2 | adopt 0.05 < adam 0.09 | yes |" in text
    assert "| 0.99 | 0.03 | adam 0.3 < adopt 0.4 | adam 0.06 < adopt 0.07 | yes |" in text
    long["final"][0]["capped_loss"] = 0.01  # adam now first at beta2 0.5
    text = "\n".join(sweep_report._length_check(short, long))
    assert "| 0.5 | 0.03 | adopt 0.1 < adam 0.2 | adam 0.01 < adopt 0.05 | no |" in text
    assert "the same in 1 of 2 (beta2, lr) points; ADOPT against Adam alone, in 1 of 2." in text
    assert "5x the cells' length" in text


def test_the_cost_line_names_the_machines_that_the_cells_recorded(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    doc = tmp_path / "docs" / "reproduction" / "sweep.md"
    assert run_cli("sweep", "mnist", "--out", out, *_tiny(data, "beta2s=0.9", "lrs=1e-3", "optimizers=adopt"),
                   "--doc", doc) == 0
    cell = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert cell["cpus"] == os.cpu_count()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cost"]["cpus"] == [os.cpu_count()]
    cost = doc.read_text().partition("\n## Cost\n")[2]
    assert f"torch thread(s) of a {os.cpu_count()}-CPU machine" in cost
    assert sweep_report._machines([2, 16]) == " of 2- and 16-CPU machines"
    assert sweep_report._machines(None) == ""  # cells written before the count was recorded: nothing claimed
