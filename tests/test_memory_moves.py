"""Tensors that change under the same Python object, and the fused CPU step that writes through addresses.

The fused kernel is handed raw addresses, so a table that no longer describes the tensors would write into
freed or foreign memory. Every event here changes a tensor's storage, dtype or layout while keeping the
Python objects (``p.data = ...``, ``exp_avg.data = ...``, a gradient of another dtype, a gradient of another
layout at the same address) or replaces them (``load_state_dict``, new gradients, a step without one
parameter). Through all of them the fused optimizer must follow the for-loop one, which reads every tensor
afresh, step by step (float64: they differ only where the C compiler fuses a multiply-add).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from capabilities import KERNELS

import adoptim
from adoptim import functional
from adoptim.kernels import fused_cpu

HYPER = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, clip_exponent=0.25)
TOL = dict(rtol=1e-12, atol=1e-14)

@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    # Two threads split one C call's work, so a race between two updates of the same memory shows.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


needs_kernel = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


def _swap_param_storage(opt: adoptim.ADOPT) -> None:
    p = opt.param_groups[0]["params"][1]
    p.data = p.data.clone()  # same values, another address


def _swap_state_storage(opt: adoptim.ADOPT) -> None:
    st = opt.state[opt.param_groups[0]["params"][0]]
    st["exp_avg"].data = st["exp_avg"].data.clone()  # the old storage is freed: a stale table would write there
    st["exp_avg_sq"].data = st["exp_avg_sq"].data.clone()
    st["step"].data = st["step"].data.clone()


def _transpose_square_param(opt: adoptim.ADOPT) -> None:
    # The same address and shape, another layout: the parameter is no longer contiguous.
    p = opt.param_groups[0]["params"][2]
    p.data = p.data.t()
    for key in ("exp_avg", "exp_avg_sq"):
        opt.state[p][key].data = opt.state[p][key].data.t()


def _reload(opt: adoptim.ADOPT) -> None:
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


EVENTS: dict[int, Callable[[adoptim.ADOPT], None]] = {
    2: _swap_param_storage,
    3: _swap_state_storage,
    5: _reload,
    7: _transpose_square_param,
}


def _grads(t: int, params: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor | None]:
    grads: list[torch.Tensor | None] = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    if t == 4:
        grads[1] = None  # a step without this parameter
    return grads


def _set_grads(t: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], kept: list[torch.Tensor]) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            p.grad = None
        elif t == 6 and i == 0:
            p.grad = None
            p.grad_dtype = torch.float32  # a gradient of another dtype than its parameter's
            p.grad = g.float()
        elif t == 8 and p.dim() == 2:
            p.grad = g.t().contiguous().t()  # same values, not contiguous
        elif t in (9, 10):
            p.grad = kept[i].copy_(g)  # the same gradient tensors every step, updated in place
        else:
            p.grad = g.clone()


@needs_kernel
def test_fused_follows_the_forloop_kernel_through_every_move_of_memory() -> None:
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64),
            torch.randn(5, 5, generator=gen, dtype=torch.float64)]
    runs = {}
    for name, flags in (("fused", dict(fused=True)), ("loop", dict(foreach=False))):
        params = [p.clone().requires_grad_(True) for p in init]
        runs[name] = (params, adoptim.ADOPT(params, **flags, **HYPER), [torch.zeros_like(p) for p in params])
    for t in range(11):
        grads = _grads(t, init, gen)
        for params, opt, kept in runs.values():
            _set_grads(t, params, grads, kept)
            if t in EVENTS:
                EVENTS[t](opt)
            opt.step()
            if t == 6:
                params[0].grad = None
                params[0].grad_dtype = None  # back to the parameter's dtype
        (fp, fopt, _), (lp, lopt, _) = runs["fused"], runs["loop"]
        for i, (a, b) in enumerate(zip(fp, lp)):
            where = f"step {t}, parameter {i}"
            torch.testing.assert_close(a.detach(), b.detach(), **TOL, msg=lambda m, where=where: f"{where}: {m}")
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(fopt.state[a][key], lopt.state[b][key], **TOL)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_a_parameter_listed_twice_gets_one_state(kernel: str) -> None:
    # torch.optim only warns about a repeated parameter; its state must be one, stepped twice per call
    # as torch's own for-loop optimizers do, not two states of which one is lost. The foreach kernel
    # would read the step of both entries before it moves (v = 2 g^2, no update): it hands such a call
    # to the for-loop kernel, as the fused kernels do.
    p = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt = adoptim.ADOPT([p, p], lr=0.1, **KERNELS[kernel])
    p.grad = torch.ones(3)
    opt.step()
    assert len(opt.state) == 1 and float(opt.state[p]["step"]) == 2
    # The first entry's call set v = g*g; the second made the first update: -lr * (1 - beta1) * 1.
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.1 * 0.1))
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.ones(3))  # beta2 * 1 + (1 - beta2) * 1


@needs_kernel
def test_a_parameter_listed_twice_takes_its_updates_in_order_in_the_fused_kernel() -> None:
    # Two entries of one tensor in one C call would be updated by two threads at once; the fused step
    # gives them in order instead, exactly as the for-loop kernel does.
    gen = torch.Generator().manual_seed(9)
    init = torch.randn(300_000, generator=gen, dtype=torch.float64)  # large enough for both threads
    other = torch.randn(5, generator=gen, dtype=torch.float64)
    grads = [(torch.randn(init.shape, generator=gen, dtype=init.dtype), torch.randn(5, generator=gen, dtype=init.dtype))
             for _ in range(3)]
    runs = []
    with _threads(2):
        for flags in (dict(fused=True), dict(foreach=False)):
            p, q = init.clone().requires_grad_(True), other.clone().requires_grad_(True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                opt = adoptim.ADOPT([p, q, p], lr=0.1, **flags)
            for gp, gq in grads:
                p.grad, q.grad = gp.clone(), gq.clone()
                opt.step()
            runs.append((p, q, opt))
    (fp, fq, fopt), (lp, lq, lopt) = runs
    assert float(fopt.state[fp]["step"]) == 6 and len(fopt.state) == 2
    torch.testing.assert_close(fp.detach(), lp.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fopt.state[fp]["exp_avg_sq"], lopt.state[lp]["exp_avg_sq"], rtol=0, atol=0)
    torch.testing.assert_close(fq.detach(), lq.detach(), **TOL)


@needs_kernel
def test_parameters_that_are_overlapping_views_of_one_buffer_take_their_updates_in_order() -> None:
    # Two parameters that are views of one buffer and share elements (not at the same start address):
    # one C call would update the shared elements in two threads at once; the fused step gives the two
    # updates in order instead, exactly as the for-loop kernel does.
    gen = torch.Generator().manual_seed(10)
    n = 300_000  # large enough for both threads
    init = torch.randn(3 * n // 2, generator=gen, dtype=torch.float64)
    grads = [(torch.randn(n, generator=gen, dtype=init.dtype), torch.randn(n, generator=gen, dtype=init.dtype))
             for _ in range(3)]
    runs = []
    with _threads(2):
        for flags in (dict(fused=True), dict(foreach=False)):
            buf = init.clone()
            a, b = torch.nn.Parameter(buf[:n]), torch.nn.Parameter(buf[n // 2:])
            assert a.data_ptr() == buf.data_ptr() and b.data_ptr() == buf[n // 2:].data_ptr()  # views
            opt = adoptim.ADOPT([a, b], lr=0.1, **flags)
            for ga, gb in grads:
                a.grad, b.grad = ga.clone(), gb.clone()
                opt.step()
            runs.append(buf)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@needs_kernel
def test_the_c_call_refuses_overlapping_parameters_and_changes_nothing() -> None:
    lib = fused_cpu.library()
    buf = torch.randn(300, dtype=torch.float64)
    for second, overlaps in ((buf[100:], True), (buf[200:], False), (buf[:0], False), (buf[199:], True)):
        params = [buf[:200], second]
        lists = [params, [torch.randn(x.shape, dtype=x.dtype) for x in params],
                 [torch.zeros_like(x) for x in params], [torch.ones_like(x) for x in params],
                 [torch.ones((), dtype=torch.float32) for _ in params]]
        before = [x.clone() for x in (buf, *lists[2], *lists[3], *lists[4])]
        table = fused_cpu._bulk_table(*lists)
        status = lib.adopt_cpu_step(2, table.buffer_info()[0], 0.1, 0.9, 0.99, 1e-6, 0.0, 0, 0, 0.0, 0, 0, 1.0, 2)
        assert status == (1 if overlaps else 0), (second.data_ptr() - buf.data_ptr(), second.numel())
        after = (buf, *lists[2], *lists[3], *lists[4])
        changed = any(not torch.equal(x, y) for x, y in zip(before, after))
        assert changed != overlaps  # refused: nothing changed; taken: the step ran


@needs_kernel
def test_parameters_that_are_disjoint_views_of_one_buffer_keep_the_fused_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A flat buffer cut into parameters (disjoint views, as flat-parameter schemes make) is no reason to
    # leave the fused kernel.
    calls = []
    monkeypatch.setattr(functional, "single_tensor_adopt", lambda *a, **k: calls.append(1))
    buf = torch.randn(1000, dtype=torch.float64)
    init = buf.clone()
    params = [torch.nn.Parameter(buf[i: i + 250]) for i in range(0, 1000, 250)]
    opt = adoptim.ADOPT(params, lr=0.1, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert not calls
    # The first step sets v = g*g = 1; the second moves every element by lr * m with m = (1 - beta1) * g / 1.
    torch.testing.assert_close(buf, init - 0.1 * 0.1, rtol=0, atol=1e-15)
    torch.testing.assert_close(buf, torch.cat([p.detach() for p in params]), rtol=0, atol=0)  # still views
    assert all(float(opt.state[p]["step"]) == 2 for p in params)
