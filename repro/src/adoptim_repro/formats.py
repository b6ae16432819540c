"""The data formats the experiments read, each in one place: IDX files, pickled numpy arrays, and the
data files that ship inside installed packages.

- :func:`read_idx`: the IDX container of MNIST and Fashion-MNIST (gzipped or not) as a uint8 array.
- :func:`safe_unpickle` / :func:`load_pickle`: a restricted unpickler with one allow-list: plain
  containers, numbers, strings and numpy arrays. Anything else a file asks for (a class, a function
  call) is refused before any of it runs.
- :func:`package_dir`: where an installed package lives, found without importing (running) it; the
  data wheels here declare stale dependencies that are not installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np


# --------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` or plain, told by its content) as an array of its declared shape."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} ends inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {dims}")
    return data.reshape(dims)


# --------------------------------------------------------------------------- restricted unpickling
class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something other than numpy arrays and plain containers."""


def _np_reconstruct(cls: type, shape: Any, dtype: Any) -> np.ndarray:
    # What numpy's own _reconstruct does: an empty array whose state __setstate__ fills in next.
    if cls is not np.ndarray:
        raise UnsafePickleError(f"refusing to build {cls!r}: only numpy arrays are allowed")
    return np.ndarray.__new__(cls, shape, dtype)


def _np_scalar(dtype: np.dtype, data: bytes | str) -> Any:
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype, count=1)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    # Protocol-5 pickles of arrays (numpy >= 1.16) rebuild them from a raw buffer.
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if order == "F" else "C")


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 carry them as codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# The one allow-list (numpy 1 spells the module numpy.core, numpy 2 numpy._core).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}
for _mod in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_mod}.multiarray", "_reconstruct")] = _np_reconstruct
    _ALLOWED[(f"{_mod}.multiarray", "scalar")] = _np_scalar
    _ALLOWED[(f"{_mod}.numeric", "_frombuffer")] = _np_frombuffer


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing global {module}.{name} in a data file: only numpy arrays are "
                                    "allowed") from None


def safe_unpickle(data: bytes, encoding: str = "bytes") -> Any:
    """``pickle.loads`` admitting only numpy arrays, numbers, strings and plain containers.

    ``encoding`` is how Python 2 strings are read: ``"bytes"`` keeps them as bytes (CIFAR-10's batches),
    ``"latin1"`` is what numpy arrays pickled by Python 2 need (the MNIST wheel's file).
    """
    return _ArraysOnly(io.BytesIO(data), encoding=encoding).load()


def load_pickle(path: str | os.PathLike, encoding: str = "bytes") -> Any:
    """:func:`safe_unpickle` of a file, gunzipped first when its name ends in ``.gz``."""
    raw = Path(path).read_bytes()
    return safe_unpickle(gzip.decompress(raw) if str(path).endswith(".gz") else raw, encoding)


# --------------------------------------------------------------------------- data in packages
def package_dir(name: str, hint: str) -> Path:
    """The directory of the installed package ``name``, found without importing it.

    Raises FileNotFoundError naming the package and ``hint`` (how to install it) when it is missing.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(name: str, relative: str, hint: str) -> Path:
    """The file ``relative`` inside the installed package ``name`` (see :func:`package_dir`)."""
    path = package_dir(name, hint) / relative
    if not path.is_file():
        raise FileNotFoundError(f"the installed package {name!r} has no {relative} ({path}); {hint}")
    return path
