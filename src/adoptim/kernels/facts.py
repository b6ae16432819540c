"""Tensors' facts checked in C, a whole list per call: the per-step check of a kept collection.

:class:`adoptim.ADOPT` keeps each param group's collection between steps behind a check that every fact
it rests on still holds (``adoptim/_plan.py``): each parameter's and state tensor's data address, size,
dtype, device, layout, sizes and strides, and that each new gradient is a dense contiguous tensor of its
parameter's dtype, device and size. Read from Python, each fact of each tensor is a method call (about
100 ns on a slow core); ``csrc/facts.c`` reads them all in one call, through torch's stable C shim (the
``aoti_torch_*`` functions that ahead-of-time compiled models call), for a few nanoseconds each.

The C library is the fused CPU kernel's (it has no link to torch: Python looks the shim functions up in
the loaded torch library and hands over their addresses), and the facts are the same for tensors on any
device, so the check serves every kernel. Where the library or the shim is missing, or the self-test
at the first use disagrees with what Python reads, :func:`kept_facts` returns ``None`` and the caller
checks the same facts in Python.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from array import array
from collections.abc import Callable, Sequence
from itertools import chain
from operator import attrgetter

import torch
from torch import Tensor

from .common import PLAIN_TENSOR_TYPES

__all__ = ["KeptFacts", "kept_facts"]

_impl = attrgetter("_cdata")  # the address of a tensor's TensorImpl, the same for the object's lifetime
# How the C side is given tensors: their objects' addresses (``id``, where the at::Tensor is found at a
# fixed offset in the object, see _object_offset) or their ``_cdata``; set by _library.
_handles: Callable[[Tensor], int] = _impl
_is_neg = Tensor.is_neg
_FACT_HEAD = 4  # csrc/facts.c: address, numel, dtype, dim; then sizes and strides
_SHIM = ("aoti_torch_get_data_ptr", "aoti_torch_get_numel", "aoti_torch_get_dim", "aoti_torch_get_dtype",
         "aoti_torch_get_device_type", "aoti_torch_get_device_index", "aoti_torch_get_layout",
         "aoti_torch_get_sizes", "aoti_torch_get_strides", "aoti_torch_is_contiguous")
_c_i64, _c_ptr = ctypes.c_int64, ctypes.c_void_p


def _torch_library() -> ctypes.CDLL:
    """The loaded torch library that exports the shim (loading it again only returns its handle)."""
    names = {"darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}
    path = os.path.join(os.path.dirname(torch.__file__), "lib", names.get(sys.platform, "libtorch_cpu.so"))
    return ctypes.CDLL(path)


def _object_offset(offset: int | None = None) -> int:
    """Where a Python tensor object holds its at::Tensor (whose one field is the TensorImpl*), or -1.

    torch's THPVariable is the object header, then the at::Tensor: the offset is the header's size
    (or ``offset``, to probe another). Taken only where it holds for tensors of several kinds; reading
    ``id(t)`` costs Python less than half of reading ``t._cdata``, which shows at a thousand gradients
    a step.
    """
    offset = object.__basicsize__ if offset is None else offset
    base = torch.zeros(3, 4)
    leaf = torch.nn.Parameter(torch.ones(5))
    leaf.grad = torch.ones(5)
    probes = [base, base.t(), leaf, leaf.grad, torch.zeros((), dtype=torch.float64)]
    try:
        if all(ctypes.c_int64.from_address(id(t) + offset).value == t._cdata for t in probes):
            return offset
    except (ValueError, OverflowError, AttributeError):
        pass
    return -1


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The C library with the shim bound and self-tested, or ``None`` (the caller checks in Python)."""
    from .fused_cpu import _load

    lib = _load()[0]
    if lib is None:
        return None
    try:
        shim = _torch_library()
        addresses = array("q", [ctypes.cast(getattr(shim, name), _c_ptr).value for name in _SHIM])
        shim.aoti_torch_layout_strided.restype = ctypes.c_int32
        lib.adopt_facts_bind.restype = ctypes.c_int
        lib.adopt_facts_bind.argtypes = [_c_ptr, ctypes.c_int32, _c_i64]
        lib.adopt_facts_record.restype = _c_i64
        lib.adopt_facts_record.argtypes = [_c_i64, _c_ptr, _c_ptr, _c_i64]
        lib.adopt_facts_check.restype = _c_i64
        lib.adopt_facts_check.argtypes = [_c_i64, _c_ptr, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr]
        lib.adopt_facts_args = (addresses, shim.aoti_torch_layout_strided())
        if not _bind(lib, _object_offset()):
            return None
    except (OSError, AttributeError):
        return None
    return lib if _self_test(lib) else None


def _bind(lib: ctypes.CDLL, offset: int) -> bool:
    """Bind the shim in the C library, the tensors given as objects' addresses (``offset`` >= 0: where
    the object holds its at::Tensor) or as ``_cdata`` cells (-1)."""
    global _handles
    addresses, strided = lib.adopt_facts_args
    if lib.adopt_facts_bind(addresses.buffer_info()[0], strided, offset) != 0:
        return False
    _handles = id if offset >= 0 else _impl
    return True


def _python_facts(t: Tensor) -> list[int]:
    """What ``csrc/facts.c`` records for ``t``, read in Python (the dtype and device codes excepted)."""
    return [t.data_ptr(), t.numel(), t.dim(), *t.shape, *t.stride()]


def _self_test(lib: ctypes.CDLL) -> bool:
    """Whether the C side reads what Python reads, on tensors of several layouts (else it is not used)."""
    base = torch.arange(24.0).reshape(2, 3, 4)
    probes = [base, base.transpose(0, 2)[1:], torch.zeros(()), torch.zeros(0, 5, dtype=torch.float64)]
    facts = KeptFacts(lib, probes, len(probes))
    if facts.length < 0:
        return False
    got, at = [], 0
    for _ in probes:
        head = facts.facts[at: at + _FACT_HEAD]
        k = _FACT_HEAD + 2 * head[3]
        got.append([head[0], head[1], head[3], *facts.facts[at + _FACT_HEAD: at + k]])
        at += k
    if got != [_python_facts(t) for t in probes]:
        return False
    # The gradient check: the same dtype and size pass (with their addresses); another dtype, another
    # size and a non-contiguous tensor are refused, each at its index.
    grads = [torch.ones(2, 3, 4), torch.ones(3, 3, 2), torch.zeros(()),
             torch.zeros(0, 5, dtype=torch.float64)]
    if facts.check(grads) is not True or list(facts.grad_ptrs) != [g.data_ptr() for g in grads]:
        return False
    for bad in (torch.ones(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, 5), torch.ones(4, 3, 2).transpose(0, 2)):
        if facts.check([bad, *grads[1:]]) is not False:
            return False
    return facts.check(grads) is True


class KeptFacts:
    """The facts of a kept collection's tensors, recorded once, and the check of one step.

    ``tensors``: the parameters first (``n`` of them), then any other tensors the collection rests on
    (state); their facts are recorded now. The object holds the tensors (the addresses the C side is
    given are only valid while they live).
    """

    __slots__ = ("lib", "tensors", "n", "handles", "handles_address", "facts", "facts_address", "length",
                 "grad_ptrs", "grad_ptrs_address")

    def __init__(self, lib: ctypes.CDLL, tensors: Sequence[Tensor], n: int) -> None:
        self.lib, self.tensors, self.n = lib, list(tensors), n
        self.handles = array("q", list(map(_handles, self.tensors)))
        self.handles_address = self.handles.buffer_info()[0]
        cap = _FACT_HEAD * len(self.tensors) + 2 * sum(map(Tensor.dim, self.tensors))
        self.facts = array("q", bytes(8 * cap))
        self.facts_address = self.facts.buffer_info()[0]
        self.length = lib.adopt_facts_record(len(self.tensors), self.handles_address, self.facts_address, cap)
        self.grad_ptrs = array("q", bytes(8 * n))
        self.grad_ptrs_address = self.grad_ptrs.buffer_info()[0]

    def check(self, grads: list[Tensor]) -> bool | None:
        """This step's check: ``None`` when a tensor's facts changed (the collection is stale); ``True``
        when the gradients (one per parameter) are plain, dense, contiguous, not lazily negated, of their
        parameters' dtypes, devices and sizes, with their addresses now in :attr:`grad_ptrs`; ``False``
        when the facts hold but a gradient is not such a tensor (the caller checks the gradients)."""
        usable = len(grads) == self.n and set(map(type, grads)) <= PLAIN_TENSOR_TYPES
        g_handles = array("q", list(map(_handles, grads))) if usable else array("q")  # from a list: faster
        status = self.lib.adopt_facts_check(len(self.tensors), self.handles_address, self.facts_address,
                                            self.length, len(g_handles), g_handles.buffer_info()[0],
                                            self.grad_ptrs_address)
        if 0 < status <= len(self.tensors):
            return None
        return usable and status == 0 and not any(map(_is_neg, grads))


def kept_facts(params: list[Tensor], *state: list[Tensor]) -> KeptFacts | None:
    """The recorded facts of ``params`` and the ``state`` lists (plain dense tensors), or ``None`` where
    they cannot be checked in C (no library, a tensor of another layout): then the caller checks in Python."""
    lib = _library()
    if lib is None:
        return None
    facts = KeptFacts(lib, list(chain(params, *state)), len(params))
    return facts if facts.length >= 0 else None
