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
    assert kept.check(grads[:1]) is False  # not one per parameter
    assert kept.check(grads) is True
    # A fact of a kept tensor changed: the answer is None (the collection is stale).
    state[2].data = torch.tensor(3.0)  # a step counter's data replaced
    assert kept.check(grads) is None
