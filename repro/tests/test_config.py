"""Bad configs are refused before anything runs, with one line naming what was wrong."""

from __future__ import annotations

import pytest

from adoptim_repro import toy
from adoptim_repro.config import ConfigError, resolve
from repro_helpers import run_cli, tiny_mnist

BAD = [
    (["toy", "--set", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
    (["toy", "--set", "steps=abc"], "config key 'steps' expects an int, got 'abc'"),
    (["toy", "--set", "steps=1.5"], "config key 'steps' expects an int"),
    (["toy", "--set", "steps=0"], "config key 'steps' must be >= 1, got 0"),
    (["toy", "--set", "runs=-3"], "config key 'runs' must be >= 1"),
    (["toy", "--set", "ks=10,1"], "config key 'ks' needs values >= 2"),
    (["toy", "--set", "beta2s=0.5,1.0"], "config key 'beta2s' needs values in [0, 1)"),
    (["toy", "--set", "compile=maybe"], "config key 'compile' expects a bool"),
    (["toy", "--set", "optimizers=adam,sgd"], "unknown optimizer 'sgd' in 'optimizers'"),
    # the real reason first: not "adamax has no settings", which giving them would not cure
    (["toy", "--set", "optimizers=adamax"],
     "this experiment runs only adam, amsgrad, adopt, adopt-noclip, not 'adamax'"),
    (["toy", "--set", "adam.lr=-1"], "optimizer 'adam': lr must be a finite number > 0, got -1.0"),
    (["toy", "--set", "adam.betas=0.9"], "config key 'adam.betas' expects 2 comma-separated values"),
    (["toy", "--set", "adam.momentum=0.9"], "unknown optimizer setting 'adam.momentum'"),
    (["toy", "--set", "lion.lr=0.1"], "unknown optimizer 'lion' in 'lion.lr'"),
    (["toy", "--set", "steps"], "--set expects key=value, got 'steps'"),
    (["toy", "--seeds", "0"], "config key 'seeds' must be >= 1, got 0"),
    (["mnist", "--set", "batch_size=70000"], "config key 'batch_size' must be <= 60000"),
    (["vae", "--set", "latent=0"], "config key 'latent' must be >= 1, got 0"),
    (["mnist", "--set", "data_dir=/no/such/dir"], "config key 'data_dir': '/no/such/dir' is not a directory"),
    (["nosuchexperiment"], "unknown experiment 'nosuchexperiment'"),
    (["toy", "--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
    (["toy", "--checkpoint-every", "-5"], "--checkpoint-every must be >= 0 seconds, got -5.0"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_is_one_clear_line_and_nothing_runs(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*argv, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("adoptim: error: ") and message in err, err
    assert not out.exists()


def test_data_dir_without_idx_files_is_refused(tmp_path, capsys):
    assert run_cli("vae", "--set", f"data_dir={tmp_path}", "--out", tmp_path / "out") == 2
    assert "has no train-images-idx3-ubyte[.gz]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_values_parse_by_field_type():
    cfg = resolve(toy.ToyConfig, [("steps", "2e6"), ("beta2s", "0.1, 0.9"), ("compile", "false"),
                                  ("adopt.betas", "0.8,0.99"), ("adopt.lr", "3e-3")])
    assert cfg.steps == 2_000_000 and cfg.beta2s == (0.1, 0.9) and cfg.compile is False
    assert cfg.optim["adopt"].betas == (0.8, 0.99) and cfg.optim["adopt"].lr == 3e-3
    assert cfg.optim["adam"].lr == toy.ToyConfig().optim["adam"].lr  # others untouched


def test_optional_field_accepts_none(tmp_path, monkeypatch):
    from adoptim_repro import mnist_data
    from adoptim_repro.mnist import MnistConfig

    monkeypatch.setattr(mnist_data, "wheel_path", lambda: tmp_path)  # the wheel need not be installed
    assert resolve(MnistConfig, [("data_dir", "none")]).data_dir is None
    data = str(tiny_mnist(tmp_path / "d", n_train=10, n_test=10))
    assert resolve(MnistConfig, [("data_dir", data)]).data_dir == data


def test_rerun_with_other_config_into_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["toy", "--set", "steps=64", "--set", "runs=4", "--set", "compile=false", "--set", "optimizers=adam"]
    assert run_cli(*args, "--out", out) == 0
    capsys.readouterr()
    assert run_cli(*args, "--set", "runs=5", "--out", out) == 2
    err = capsys.readouterr().err
    assert "was made with runs=4, not 5" in err
    # More seeds are more units next to the finished ones, not a different config.
    before = (out / "runs" / "adam-s0.json").stat().st_mtime_ns
    assert run_cli(*args, "--seeds", "2", "--out", out) == 0
    assert (out / "runs" / "adam-s0.json").stat().st_mtime_ns == before
    assert (out / "runs" / "adam-s1.json").exists()


def test_preset_values_are_type_checked():
    with pytest.raises(ConfigError, match="config key 'steps' expects"):
        resolve(toy.ToyConfig, [("steps", [1, 2])])
