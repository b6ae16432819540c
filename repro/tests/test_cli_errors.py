"""Bad input and damaged results: one line naming what is wrong (exit status 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_helpers import run_cli

SMALL = ["--set", "steps=200", "--set", "runs=4", "--set", "ks=10", "--set", "beta2s=0.5", "--set", "log_points=4",
         "--set", "compile=false", "--set", "optimizers=adam,adopt"]


def _toy(out: Path, *extra: str) -> int:
    return run_cli("toy", *SMALL, *extra, "--out", out)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("adoptim: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_nan_values_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # NaN passes every range check (its comparisons are all false) and never equals itself, so a run made
    # with it could not even be resumed.
    assert _toy(tmp_path / "a", "--set", "clip_exponent=nan") == 2
    assert "'clip_exponent' expects a number, got 'nan'" in _error(capsys)
    assert _toy(tmp_path / "b", "--set", "adopt.lr=nan") == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_out_that_cannot_hold_results_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "sub"):
        assert _toy(out) == 2
        assert f"--out {out} cannot hold results" in _error(capsys)


def test_the_same_run_asked_twice_is_refused_before_anything_is_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert _toy(tmp_path / "o", "--set", "optimizers=adam,adam") == 2
    assert "the same run twice" in _error(capsys)
    assert not (tmp_path / "o" / "config.json").exists()


def test_damaged_results_are_named_and_stale_temporaries_removed(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert _toy(out) == 0
    capsys.readouterr()
    runs = sorted((out / "runs").glob("*.json"))
    assert runs
    # A kill during an atomic write leaves a temporary file, never read; the next run removes it.
    stale = out / "checkpoints" / ".adopt-s0.pt.x1y2.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"\0" * 100)
    assert _toy(out) == 0 and not stale.exists()
    capsys.readouterr()

    text = runs[0].read_text()
    runs[0].write_text(text[: len(text) // 2])  # damaged from outside
    assert _toy(out) == 2
    message = _error(capsys)
    assert f"{runs[0]} cannot be read" in message and "delete it to run this unit again" in message

    runs[0].write_text(text)
    (out / "config.json").write_text("[]")
    assert _toy(out) == 2
    assert "config.json does not hold what this runner writes there" in _error(capsys)


def test_a_damaged_checkpoint_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoints").mkdir()
    first = "adam-s0"  # the first unit
    (out / "checkpoints" / f"{first}.pt").write_bytes(b"not a checkpoint")
    assert _toy(out) == 2
    message = _error(capsys)
    assert f"checkpoint {out / 'checkpoints' / first}.pt cannot be read" in message and "delete it" in message


@pytest.mark.parametrize("setting", ["eval_every=0", "val_every=0", "dropout=1.5", "micro_batch=-1"])
def test_gpt_settings_that_would_fail_after_training_are_refused_first(setting: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("gpt", "--quick", "--set", setting, "--out", tmp_path / "o") == 2
    assert f"'{setting.split('=')[0]}'" in _error(capsys)


def test_a_value_only_the_data_can_refuse_is_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A block longer than the text: the data are read before the first unit, so nothing is written.
    out = tmp_path / "o"
    assert run_cli("gpt", "--quick", "--set", "block_size=100000000", "--out", out) == 2
    assert "'block_size' (100000000) needs more than the" in _error(capsys)
    assert not out.exists()


def test_a_run_that_failed_before_saving_anything_may_be_rerun_with_another_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A unit that fails before it saves anything (here made to) leaves only config.json; the corrected
    # command may then use the same --out.
    import dataclasses

    from adoptim_repro import toy

    def fails(cfg: object, unit: object, ctx: object) -> None:
        raise ValueError("failed in the unit")

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(toy, "EXPERIMENT", dataclasses.replace(toy.EXPERIMENT, run=fails))
        with pytest.raises(ValueError, match="failed in the unit"):
            _toy(out, "--set", "lr_decay=0.5")
    assert (out / "config.json").exists() and not (out / ".lock").exists()
    assert _toy(out) == 0
    assert "was made with" not in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["mnist", "vae"])
def test_evaluations_that_would_be_skipped_are_refused(experiment: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Evaluations happen at logged steps: eval_every=15 with log_every=10 would evaluate at 30, 60, ...
    args = ("--quick", "--set", "eval_every=15", "--set", "log_every=10", "--out", tmp_path / "o")
    assert run_cli(experiment, *args) == 2
    assert "'eval_every' (15) must be a multiple of 'log_every' (10)" in _error(capsys)
