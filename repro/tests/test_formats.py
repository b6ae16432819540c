"""The shared data formats: the IDX reader, the one restricted unpickler and the package locator."""

from __future__ import annotations

import collections
import gzip
import os
import pickle

import numpy as np
import pytest

from adoptim_repro import formats
from repro_helpers import write_idx


def test_read_idx_rejects_a_wrong_header(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"\x00" * 12)  # 0x0d: floats, not bytes
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        formats.read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00")  # three dimensions declared, the header cut short
    with pytest.raises(ValueError, match="ends inside its IDX header"):
        formats.read_idx(p)


def test_idx_rejects_bad_magic_and_short_data(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        formats.read_idx(bad)
    short = tmp_path / "y-idx1-ubyte"
    write_idx(short, np.arange(5))
    short.write_bytes(short.read_bytes()[:-2])
    with pytest.raises(ValueError, match="holds 3 bytes of data"):
        formats.read_idx(short)


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz", "a-gzipped-without-suffix"])
def test_read_idx_reads_plain_and_gzipped_files_alike(tmp_path, name):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / name
    write_idx(path, x)
    if name.endswith("suffix"):  # gzip told by its content, not by its name
        path.write_bytes(gzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(formats.read_idx(path), x)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("encoding", ["bytes", "latin1"])
def test_one_allow_list_reads_arrays_of_every_protocol(protocol, encoding):
    # The CIFAR-10 batches (a dict of bytes keys) and MNIST's (tuples of arrays), at old and new protocols.
    data = {b"labels": [1, 2], b"data": np.arange(6, dtype=np.uint8).reshape(2, 3),
            "x": (np.float32(0.5), np.linspace(0, 1, 4))}
    got = formats.safe_unpickle(pickle.dumps(data, protocol=protocol), encoding=encoding)
    assert got[b"labels"] == [1, 2] and got["x"][0] == np.float32(0.5)
    np.testing.assert_array_equal(got[b"data"], data[b"data"])
    np.testing.assert_array_equal(got["x"][1], data["x"][1])


def test_the_unpickler_refuses_anything_but_arrays_before_running_it(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must not run",))

    with pytest.raises(formats.UnsafePickleError, match="refusing global builtins.print"):
        formats.safe_unpickle(pickle.dumps(Boom()))
    with pytest.raises(formats.UnsafePickleError, match="only numpy arrays"):
        formats.safe_unpickle(pickle.dumps(np.ma.masked_array([1.0, 2.0])))  # an ndarray subclass
    assert issubclass(formats.UnsafePickleError, pickle.UnpicklingError)


def test_package_locator_finds_without_importing_and_names_what_is_missing():
    assert (formats.package_dir("adoptim_repro", "hint") / "formats.py").is_file()
    with pytest.raises(FileNotFoundError, match="package 'no_such_package_here' is not installed; pip install it"):
        formats.package_dir("no_such_package_here", "pip install it")
    with pytest.raises(FileNotFoundError, match="has no data/none.bin"):
        formats.package_file("adoptim_repro", "data/none.bin", "hint")


@pytest.mark.parametrize("protocol", [2, 4])
def test_arrays_only_pickle_round_trips(tmp_path, protocol):
    path = tmp_path / "ok.pkl.gz"
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), [np.zeros(2)])
    with gzip.open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=protocol)
    (a, b), (c,) = formats.load_pickle(path, encoding="latin1")
    assert np.array_equal(a, arrays[0][0]) and a.dtype == np.float32 and np.array_equal(b, [1, 2])


class _Payload:
    def __reduce__(self):
        return (open, ("should-never-exist.txt", "w"))


def test_pickle_with_anything_but_arrays_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = [_Payload(), {"a": np.zeros(2), "b": _Payload()}, [np.zeros(1), os.getcwd], collections.OrderedDict(a=1)]
    for i, obj in enumerate(evil):
        path = tmp_path / f"evil{i}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(formats.UnsafePickleError, match="only numpy arrays are allowed"):
            formats.load_pickle(path, encoding="latin1")
    assert not (tmp_path / "should-never-exist.txt").exists()
