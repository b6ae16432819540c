"""The imagenet experiment: ImageFolder reading, the recipe's schedule and weight-decay groups, and the
smoke run. Tests marked ``timm`` need timm and torchvision importable and skip otherwise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from adoptim_repro import image_data
from adoptim_repro.config import ConfigError, resolve
from adoptim_repro.imagenet import EXPERIMENT, ImagenetConfig, lr_schedule, model_label, param_groups

needs_fashion = pytest.mark.skipif(not (image_data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


def _timm_or_skip():
    try:
        import timm
        import timm.data  # noqa: F401
    except Exception as e:  # a broken torchvision makes timm fail with several error types
        pytest.skip(f"timm is not importable here ({type(e).__name__}); the timm test stage runs this")
    return timm


def _small_set() -> image_data.ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 9, 7), dtype=torch.uint8, generator=g)
    return image_data.ImageSet("random", images, torch.arange(12) % 3, ["b cls", "a/cls", "c"])


def test_image_folder_round_trip_is_lossless(tmp_path):
    data = _small_set()
    image_data.write_image_folder(data, tmp_path, per_class=3)
    folder = image_data.ImageFolder(tmp_path)
    assert folder.classes == ["00_b_cls", "01_a-cls", "02_c"]  # sorted, as torchvision's ImageFolder
    assert len(folder) == 9
    for k in range(3):
        originals = data.images[data.labels == k][:3]
        got = [folder[i] for i in range(len(folder)) if folder[i][1] == k]
        assert len(got) == 3
        for (img, label), orig in zip(got, originals, strict=True):
            assert label == k and torch.equal(img, orig)  # PNG keeps every byte


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        image_data.ImageFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        image_data.ImageFolder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        image_data.ImageFolder(tmp_path)


@needs_fashion
def test_fashion_image_folder_holds_the_real_images(tmp_path):
    _, test = image_data.load_fashion_mnist32()
    image_data.write_image_folder(test, tmp_path, per_class=2)
    folder = image_data.ImageFolder(tmp_path)
    assert len(folder) == 20 and folder.classes[9] == "09_Ankle_boot"
    img, label = folder[0]
    first_tshirt = test.images[(test.labels == 0).nonzero()[0, 0]]
    assert label == 0 and torch.equal(img, first_tshirt)


def test_schedule_warmup_then_cosine_closed_form():
    cfg = resolve(ImagenetConfig, [("data_dir", "x"), ("epochs", "10"), ("warmup_epochs", "2")])
    spe = 5  # steps per epoch
    lr = lr_schedule(cfg, 1e-3, spe)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(30) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert lr(50) == pytest.approx(1e-5)


def test_paper_recipe_defaults_and_config_errors():
    cfg = resolve(ImagenetConfig, [("data_dir", "x")])
    assert (cfg.optim["adamw"].lr, cfg.optim["adamw"].weight_decay) == (1e-3, 0.05)
    assert (cfg.optim["adoptw"].lr, cfg.optim["adoptw"].weight_decay) == (1e-3, 0.05)
    assert cfg.optimizers == ("adamw", "adoptw") and cfg.epochs == 300 and cfg.warmup_epochs == 20
    with pytest.raises(ConfigError, match="'data_dir' is not set"):
        resolve(ImagenetConfig, [])
    with pytest.raises(ConfigError, match="'warmup_epochs'"):
        resolve(ImagenetConfig, [("data_dir", "x"), ("warmup_epochs", "300")])


def test_tables_name_the_architecture_overrides_of_a_smoke_model():
    assert model_label(resolve(ImagenetConfig, [("data_dir", "x")])) == "swin_tiny_patch4_window7_224"
    smoke = resolve(ImagenetConfig, [("data_dir", "x"), ("embed_dim", "24"), ("depths", "1,1,1")])
    assert model_label(smoke) == "swin_tiny_patch4_window7_224 with embed_dim=24, depths=(1, 1, 1)"


@pytest.mark.timm
@pytest.mark.slow
def test_swin_tiny_is_swin_t_and_decay_skips_norms_biases_and_tables():
    _timm_or_skip()
    from adoptim_repro.imagenet import build_model

    cfg = resolve(ImagenetConfig, [("data_dir", "x")])
    model = build_model(cfg, 1000)
    assert 28.0e6 < sum(p.numel() for p in model.parameters()) < 28.6e6  # Swin-T: 28.3M parameters
    decay, quiet = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    quiet_names = [names[id(p)] for p in quiet["params"]]
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert any("relative_position_bias_table" in n for n in quiet_names)
    assert any(".norm" in n for n in quiet_names) and any(n.endswith(".bias") for n in quiet_names)
    assert (decay["weight_decay"], quiet["weight_decay"]) == (0.05, 0.0)


@pytest.mark.timm
@needs_fashion
@pytest.mark.slow
def test_smoke_run_writes_labelled_results(tmp_path):
    _timm_or_skip()
    from adoptim_repro.runner import run_experiment

    sets = {**EXPERIMENT.quick, "smoke_per_class": 4, "batch_size": 8, "epochs": 2, "warmup_epochs": 1}
    cfg = resolve(ImagenetConfig, list(sets.items()))
    summary = run_experiment(EXPERIMENT, cfg, tmp_path, log=lambda s: None)
    rows = {r["optimizer"]: r for r in summary["final"]}
    assert set(rows) == {"adamw", "adoptw"}
    for r in rows.values():
        assert "not ImageNet" in r["dataset"] and "depths=(1, 1, 1)" in r["model"]
        assert r["model"].startswith("swin_tiny_patch4_window7_224 with ")  # the smoke model's overrides
        assert 0.0 <= r["val_top1_%"] <= 100.0
    # 10 classes x 4 images, batch 8: 5 steps per epoch; one metrics line per epoch.
    lines = [json.loads(x) for x in (tmp_path / "metrics" / "adoptw-s0.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and np.isfinite([x["train_loss"] for x in lines]).all()
    assert len(list((tmp_path / "smoke_data" / "train").rglob("*.png"))) == 40


@pytest.mark.timm
@needs_fashion
@pytest.mark.slow
def test_a_run_resumed_after_its_first_epoch_ends_where_an_uninterrupted_one_does(tmp_path):
    # Mixup and CutMix draw from numpy's generator and RandAugment from Python's: both are seeded per
    # epoch with torch's, so two runs, and a run resumed from its epoch checkpoint, give the same numbers.
    _timm_or_skip()
    from adoptim_repro.runner import run_experiment

    sets = {**EXPERIMENT.quick, "smoke_per_class": 4, "batch_size": 8, "epochs": 2, "warmup_epochs": 1,
            "optimizers": ("adoptw",)}
    cfg = resolve(ImagenetConfig, list(sets.items()))
    whole = run_experiment(EXPERIMENT, cfg, tmp_path / "whole", log=lambda s: None)

    class Stop(Exception):
        pass

    import adoptim_repro.imagenet as imagenet

    real = imagenet.evaluate
    calls = []

    def evaluate_then_stop(*args, **kwargs):  # the first epoch's evaluation, then its checkpoint, then a stop
        calls.append(1)
        if len(calls) == 2:
            raise Stop
        return real(*args, **kwargs)

    imagenet.evaluate = evaluate_then_stop
    try:
        with pytest.raises(Stop):
            run_experiment(EXPERIMENT, cfg, tmp_path / "resumed", log=lambda s: None)
    finally:
        imagenet.evaluate = real
    assert (tmp_path / "resumed" / "checkpoints" / "adoptw-s0.pt").is_file()
    resumed = run_experiment(EXPERIMENT, cfg, tmp_path / "resumed", log=lambda s: None)
    assert resumed["final"] == whole["final"]
    for name in ("whole", "resumed"):
        assert len((tmp_path / name / "metrics" / "adoptw-s0.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "whole" / "metrics" / "adoptw-s0.jsonl").read_text() == \
        (tmp_path / "resumed" / "metrics" / "adoptw-s0.jsonl").read_text()
