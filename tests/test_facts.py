"""The facts check in C (``adoptim/kernels/facts.py``, ``csrc/facts.c``) against what Python reads."""

from __future__ import annotations

import pytest
import torch

from adoptim.kernels import facts, fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


def _kept(tensors: list[torch.Tensor], n: int) -> facts.KeptFacts:
    lib = facts._library()
    assert lib is not None, "the library is built, but the facts check in C failed its self-test"
    return facts.KeptFacts(lib, tensors, n)


def test_recorded_facts_are_what_python_reads() -> None:
    base = torch.arange(60.0, dtype=torch.float64).reshape(3, 4, 5)
    tensors = [base, base.permute(2, 0, 1)[1:, :, ::2], torch.zeros(()), torch.empty(0, 7, dtype=torch.bfloat16)]
    kept = _kept(tensors, 2)
    at, got = 0, []
    for _ in tensors:
        dim = kept.facts[at + 3]
        got.append([kept.facts[at], kept.facts[at + 1], dim, *kept.facts[at + 4: at + 4 + 2 * dim]])
        at += 4 + 2 * dim
    assert at == kept.length
    assert got == [facts._python_facts(t) for t in tensors]


def test_check_reads_gradient_addresses_and_notices_changes() -> None:
    params = [torch.zeros(4, 3), torch.zeros(5, dtype=torch.float64)]
    state = [torch.zeros(4, 3), torch.zeros(5, dtype=torch.float64), torch.tensor(0.0), torch.tensor(0.0)]
    kept = facts.kept_facts(params, state)
    assert kept is not None
    grads = [torch.ones(4, 3), torch.ones(5, dtype=torch.float64)]
    assert kept.check(grads) is True
    assert list(kept.grad_ptrs) == [g.data_ptr() for g in grads]
    # Gradients the kernels must check themselves: the facts hold, the answer is False.
    assert kept.check([torch.ones(3, 4).t(), grads[1]]) is False  # not contiguous
    assert kept.check([grads[0], torch.ones(5)]) is False  # another dtype
    assert kept.check([grads[0], torch.ones(6, dtype=torch.float64)[:5].clone()[:4]]) is False  # another size
    assert kept.check([grads[0], torch._neg_view(grads[1])]) is False  # lazily negated
    assert kept.check([grads[0], grads[1].to_sparse()]) is False  # not dense
    assert kept.check([grads[0], torch.ones(5, dtype=torch.float64, device="meta")]) is False  # no memory here
    assert kept.check(grads[:1]) is False  # not one per parameter
    assert kept.check(grads) is True
    # A fact of a kept tensor changed: the answer is None (the collection is stale).
    state[2].data = torch.tensor(3.0)  # a step counter's data replaced
    assert kept.check(grads) is None


def test_tensors_are_given_by_object_address_where_the_layout_was_verified() -> None:
    # torch's THPVariable holds the at::Tensor right after the object header: the check takes id(t) + that
    # offset as the handle (the fast mode); another offset is refused by the probe, not taken.
    assert facts._library() is not None
    assert facts._object_offset() == object.__basicsize__ and facts._handles is id
    assert facts._object_offset(object.__basicsize__ + 8) == -1


@pytest.mark.parametrize("mode", ["objects", "cells"])
def test_both_ways_of_giving_tensors_check_the_same(mode: str) -> None:
    lib = facts._library()
    assert lib is not None
    try:
        assert facts._bind(lib, facts._object_offset() if mode == "objects" else -1)
        assert facts._handles is (id if mode == "objects" else facts._impl)
        assert facts._self_test(lib)
        test_recorded_facts_are_what_python_reads()
        test_check_reads_gradient_addresses_and_notices_changes()
    finally:
        assert facts._bind(lib, facts._object_offset())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_probe_works_where_a_first_step_may_run(context: type) -> None:
    with context():
        assert facts._object_offset() == object.__basicsize__
