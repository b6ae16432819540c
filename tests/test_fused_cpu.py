"""The fused CPU kernel (``fused=True`` on the CPU) against the float64 reference and the for-loop kernel.

Low-precision parity is checked one step at a time: from the kernel's own (rounded) state, the float64
reference computes the step, and its result rounded once to the storage dtype is what a kernel that
computes in float32 and rounds once must produce, up to one unit in the last place (a float32 result
next to a rounding tie may land on the other side) and float32's own cancellation error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from capabilities import FLAG_COMBOS
from optim_helpers import hard_grads, hard_params, run_adopt, run_reference

import adoptim
from adoptim import functional
from adoptim.kernels import fused_cpu
from adoptim.kernels.bandwidth import bandwidth_bound
from adoptim.kernels.contract import Hyper
from adoptim.reference import adopt_step

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.9, 0.99)
needs_kernel = pytest.mark.skipif(not fused_cpu.is_available(), reason="fused CPU kernel not built")


def _ids(c: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in c.items())


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _floats(t: torch.Tensor) -> list[float]:
    return _real(t).detach().double().reshape(-1).tolist()


def _expected(p, g, m, v, step: int, hyper: dict) -> list[torch.Tensor]:
    """One reference step from the given state, rounded once to the storage dtype (real view)."""
    pf, mf, vf, _ = adopt_step(_floats(p), _floats(g), _floats(m), _floats(v), step, **hyper)
    like = _real(p)
    return [torch.tensor(x, dtype=torch.float64).reshape(like.shape).to(like.dtype) for x in (pf, mf, vf)]


def _tolerance(dtype: torch.dtype, want: torch.Tensor) -> dict:
    # One ulp of the storage dtype (rounding ties), plus float32 cancellation in lerp and the coupled
    # decay, which is bounded by float32's epsilon times the size of the terms (the tensor's maximum).
    scale = float(want.abs().max()) if want.numel() else 0.0
    eps = torch.finfo(dtype).eps
    math_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return dict(rtol=max(eps, 8 * math_eps), atol=16 * math_eps * scale + torch.finfo(dtype).tiny)


def _check_stepwise(params, grads, hyper: dict, **opt_kwargs) -> None:
    """Run ``fused=True`` and compare every step with the reference started from the kernel's state."""
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = adoptim.ADOPT(ps, fused=True, **opt_kwargs)
    for t, row in enumerate(grads):
        before = {}
        for i, (p, g) in enumerate(zip(ps, row, strict=True)):
            p.grad = None if g is None else g.clone()
            if g is None:
                continue
            st = opt.state.get(p)
            m = st["exp_avg"].clone() if st else torch.zeros_like(p)
            v = st["exp_avg_sq"].clone() if st else torch.zeros_like(p)
            step = int(st["step"]) if st else 0
            before[i] = (p.detach().clone(), g, m, v, step)
        opt.step()
        for i, (p0, g, m, v, step) in before.items():
            want = _expected(p0, g, m, v, step, hyper)
            st = opt.state[ps[i]]
            got = [_real(x.detach()) for x in (ps[i], st["exp_avg"], st["exp_avg_sq"])]
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want, strict=True):
                tol = _tolerance(a.dtype, b)
                where = f"step {t} {name} {i}"
                torch.testing.assert_close(a, b, **tol, msg=lambda e, where=where: f"{where}: {e}")
            assert float(st["step"]) == step + 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=_ids)
def test_each_step_matches_reference(dtype: torch.dtype, flags: dict) -> None:
    params = hard_params(dtype)  # zero first gradient, late gradients, complex, zero-size last
    grads = hard_grads(params, 12)
    # With eps=1e-6 the first update of a zero-initialised v is 1e6 times the gradient unclipped:
    # beyond float16's range (65504), where lerp's inf - inf differs from the reference's sum.
    eps = 1e-3 if dtype == torch.float16 else 1e-6
    hyper = dict(lr=0.01, beta1=BETAS[0], beta2=BETAS[1], eps=eps, **flags)
    _check_stepwise(params, grads, hyper, lr=0.01, betas=BETAS, eps=eps, **flags)


@needs_kernel
@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=_ids)
def test_float64_trajectory_matches_forloop(flags: dict) -> None:
    params = hard_params(torch.float64)
    grads = hard_grads(params, 32)
    kw = dict(lr=0.01, betas=BETAS, eps=1e-6, **flags)
    fused, fopt = run_adopt(params, grads, fused=True, **kw)
    loop, lopt = run_adopt(params, grads, foreach=False, **kw)
    # Same operations in float64; they differ only where the compiler fuses a multiply-add (one
    # rounding instead of two), a few ulps a step: 32 steps stay far below 1e-12 relative.
    for a, b in zip(fused, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fopt.state[a][key], lopt.state[b][key], rtol=1e-12, atol=1e-14)


@needs_kernel
def test_float32_trajectory_matches_forloop_and_reference() -> None:
    params = hard_params(torch.float32)
    grads = hard_grads(params, 32)
    kw = dict(lr=0.01, betas=BETAS, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True)
    fused, _ = run_adopt(params, grads, fused=True, **kw)
    loop, _ = run_adopt(params, grads, foreach=False, **kw)
    ref = run_reference(params, grads, lr=0.01, beta1=BETAS[0], beta2=BETAS[1], eps=1e-6,
                        weight_decay=0.1, decoupled_weight_decay=True).params()
    # Both compute in float32 with the same operations; each step adds an error of a few float32 ulps
    # to v (and so to the normalised gradient) that persists for 1/(1-beta2) = 100 steps: after 32
    # steps that is at most ~32 * 4 ulps = 1.5e-5 relative in the update, times lr in the parameter.
    for a, b, r in zip(fused, loop, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        err_fused = (_real(a.detach()).double() - _real(r)).abs().max() if a.numel() else 0.0
        err_loop = (_real(b.detach()).double() - _real(r)).abs().max() if a.numel() else 0.0
        assert err_fused <= 2 * err_loop + 1e-7  # no less accurate than the for-loop kernel


@needs_kernel
def test_mixed_dtypes_in_one_call_and_frozen_layer() -> None:
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=g).to(dt) for n, dt in
              [(7, torch.float32), (5, torch.float64), (9, torch.bfloat16), (6, torch.float16)]]
    params.append(torch.randn(4, generator=g, dtype=torch.complex64))
    frozen = torch.randn(3, requires_grad=False)
    grads = hard_grads(params, 6, seed=4)
    hyper = dict(lr=0.05, beta1=BETAS[0], beta2=BETAS[1], eps=1e-6)
    _check_stepwise(params, grads, hyper, lr=0.05, betas=BETAS, eps=1e-6)
    opt = adoptim.ADOPT([frozen], fused=True)
    opt.step()
    assert frozen.grad is None and len(opt.state) == 0


@contextlib.contextmanager
def _threading(openmp: bool) -> Iterator[None]:
    """The C library's threads: torch's OpenMP threads (skips where torch's libgomp is not loaded), or
    threads started per call."""
    lib = fused_cpu.library()
    before = lib.adopt_cpu_openmp(-1)
    if lib.adopt_cpu_openmp(int(openmp)) != int(openmp):
        lib.adopt_cpu_openmp(before)
        pytest.skip("torch does not run on libgomp here")
    try:
        yield
    finally:
        lib.adopt_cpu_openmp(before)


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False], ids=["torch-openmp-threads", "threads-per-call"])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_tensors_identically(threads: int, openmp: bool) -> None:
    # Sizes that put share boundaries inside tensors and tensors inside shares, and many tiny ones.
    sizes = [70_001, 3, 130_000, 0, 65_536, 1] + [17] * 50
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [[torch.randn(n, generator=g) for n in sizes] for _ in range(3)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = run_adopt(params, grads, fused=True)
        torch.set_num_threads(threads)
        with _threading(openmp):
            many, _ = run_adopt(params, grads, fused=True)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)  # elementwise arithmetic: the split cannot change a single bit


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_step_in_a_forked_child_does_not_hang() -> None:
    # After torch's OpenMP threads have run in a process, a parallel region in a child made by fork
    # hangs (libgomp's threads are not copied); torch's own operations hang there. The kernel then
    # starts its own threads instead. The child steps two threads' worth of parameters and sends them
    # back as bytes (a torch reduction in the child would itself hang); they must equal the parent's.
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = [torch.randn(200_000, generator=torch.Generator().manual_seed(i)).requires_grad_(True)
                  for i in range(2)]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = adoptim.ADOPT(params, lr=0.1, fused=True)
        opt.step()
        torch.mul(torch.ones(4_000_000), 2.0)  # torch's OpenMP threads exist now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest, no torch operation that could use its threads
            try:
                os.close(read)
                opt.step()
                data = b"".join(p.detach().numpy().tobytes() for p in params)
                while data:
                    data = data[os.write(write, data):]
            finally:
                os._exit(0)
        os.close(write)
        opt.step()  # the parent takes the same step
        want = b"".join(p.detach().numpy().tobytes() for p in params)
        got, deadline = b"", time.monotonic() + 30
        with os.fdopen(read, "rb") as pipe:
            os.set_blocking(pipe.fileno(), False)
            while time.monotonic() < deadline:
                chunk = pipe.read()
                if chunk:
                    got += chunk
                elif chunk == b"":  # end of file: the child has closed its end, exiting
                    break
                else:
                    time.sleep(0.005)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the step in the forked child hung")
        os.waitpid(pid, 0)
        assert got == want
    finally:
        torch.set_num_threads(old)


_FORK_BEFORE_THE_FIRST_STEP = """
import os, sys, time, signal
import torch
import adoptim
torch.set_num_threads(2)
params = [torch.randn(20_000, generator=torch.Generator().manual_seed(i)).requires_grad_(True) for i in range(10)]
for p in params:
    p.grad = torch.ones_like(p)
opt = adoptim.ADOPT(params, lr=0.1, fused=True)  # no step before the fork
torch.mul(torch.ones(4_000_000), 2.0)  # torch's OpenMP threads exist now
pid = os.fork()
if pid == 0:
    try:
        opt.step()  # state of 20k elements a tensor: torch fills it inline; the kernel takes 200k on 2 threads
        opt.step()
    finally:
        os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(0 if status == 0 else 2)
    time.sleep(0.01)
os.kill(pid, signal.SIGKILL)
sys.exit(1)
"""


@needs_kernel
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_before_the_first_step_does_not_hang() -> None:
    # The fork handler that keeps a child off libgomp's threads exists only once the library is loaded;
    # loaded at the first step, as before, a child whose first step loaded it joined the parent's team
    # and hung. It is now loaded when adoptim is imported. A fresh interpreter, so that the library is
    # loaded by the import there; exit status 1 means the child hung.
    done = subprocess.run([sys.executable, "-c", _FORK_BEFORE_THE_FIRST_STEP], timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0


@needs_kernel
def test_strided_layouts() -> None:
    g = torch.Generator().manual_seed(6)
    cl = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)
    tr = torch.randn(6, 4, generator=g).t()  # not dense-contiguous: the for-loop kernel takes it
    params = [cl, tr]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]
    grads = [[row[0].contiguous(memory_format=torch.channels_last), row[1]] for row in grads]
    ref = run_reference(params, grads, lr=0.01, beta1=0.9, beta2=0.9999, eps=1e-6).params()
    got, opt = run_adopt(params, grads, fused=True, lr=0.01)
    assert opt.state[got[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a.detach().double(), r, rtol=1e-5, atol=1e-6)


def _functional_step(params, grads, state, **kw) -> None:
    m, v, s = state
    adoptim.adopt(params, grads, m, v, s, fused=True, beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.0,
                  decoupled_weight_decay=False, clip_exponent=0.25, eps=1e-6, maximize=False, **kw)


@needs_kernel
def test_grad_scale_divides_and_found_inf_skips() -> None:
    g = torch.Generator().manual_seed(7)
    p0 = [torch.randn(10, generator=g), torch.randn(3, generator=g, dtype=torch.float64)]
    grads = [[torch.randn(x.shape, generator=g, dtype=x.dtype) for x in p0] for _ in range(3)]
    fresh = lambda: ([x.clone() for x in p0], ([torch.zeros_like(x) for x in p0],
                     [torch.zeros_like(x) for x in p0], [torch.tensor(0.0) for _ in p0]))
    plain, plain_state = fresh()
    scaled, scaled_state = fresh()
    scale = torch.tensor(1024.0)  # a power of two: scaling and unscaling are exact
    for row in grads:
        _functional_step(plain, row, plain_state)
        big = [x * scale for x in row]
        _functional_step(scaled, big, scaled_state, grad_scale=scale, found_inf=torch.tensor(0.0))
        assert all(torch.equal(a, b * scale) for a, b in zip(big, row, strict=True))  # grads untouched
    for a, b in zip(plain + sum(plain_state, []), scaled + sum(scaled_state, []), strict=True):
        assert torch.equal(a, b)
    before = [x.clone() for x in scaled + sum(scaled_state, [])]
    _functional_step(scaled, grads[0], scaled_state, grad_scale=scale, found_inf=torch.tensor(1.0))
    for a, b in zip(before, scaled + sum(scaled_state, []), strict=True):
        assert torch.equal(a, b)  # an inf anywhere: nothing changes, steps included


@needs_kernel
def test_grad_scaler_end_to_end() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def run(use_scaler: bool, poison_step: int | None = None) -> tuple[torch.nn.Linear, adoptim.ADOPT, list]:
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 1)
        opt = adoptim.ADOPT(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        scales = []
        for t in range(4):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if t == poison_step:
                model.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale() if use_scaler else 1.0)
        return model, opt, scales

    assert adoptim.ADOPT([torch.zeros(1, requires_grad=True)], fused=True)._step_supports_amp_scaling
    assert not getattr(adoptim.ADOPT([torch.zeros(1, requires_grad=True)]), "_step_supports_amp_scaling", False)
    plain, _, _ = run(False)
    scaled, _, _ = run(True)
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(a, b)  # power-of-two scale: the unscaled gradients are bit-identical
    poisoned, opt, scales = run(True, poison_step=2)
    assert scales[2] == scales[1] / 2  # the scaler saw the inf
    assert float(opt.state[poisoned.weight]["step"]) == 3  # and the optimizer skipped that step


def test_construction_errors() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="fused.*foreach"):
        adoptim.ADOPT(p, fused=True, foreach=True)
    with pytest.raises(ValueError, match="fused.*differentiable"):
        adoptim.ADOPT(p, fused=True, differentiable=True)
    with pytest.raises(ValueError, match="Invalid fused: 1"):
        adoptim.ADOPT(p, fused=1)
    with pytest.raises(ValueError, match="meta"):
        adoptim.ADOPT([torch.zeros(2, device="meta", requires_grad=True)], fused=True)
    opt = adoptim.ADOPT(p, foreach=True)
    with pytest.raises(ValueError, match="fused.*foreach"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "fused": True})
    with pytest.raises(ValueError, match="meta"):
        adoptim.ADOPT([("w", torch.zeros(2, device="meta", requires_grad=True))], fused=True)
    fused = adoptim.ADOPT(p, fused=True)
    fused.add_param_group({"params": (x for x in [torch.zeros(2, requires_grad=True)])})  # a generator
    assert len(fused.param_groups[1]["params"]) == 1 and fused.param_groups[1]["fused"]
    hyper = dict(beta1=0.9, beta2=0.9, lr=0.1, weight_decay=0.0, eps=1e-6, decoupled_weight_decay=False,
                 clip_exponent=None, maximize=False)
    with pytest.raises(ValueError, match="fused.*differentiable"):
        adoptim.adopt(p, p, p, p, [torch.tensor(0.0)], fused=True, differentiable=True, **hyper)
    with pytest.raises(ValueError, match="same shape"):
        fused_cpu.fused_cpu_adopt([torch.zeros(2)], [torch.zeros(3)], [torch.zeros(2)], [torch.zeros(2)],
                                  [torch.tensor(0.0)], Hyper(**hyper))


@needs_kernel
def test_default_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fused_cpu.fused_cpu_adopt
    monkeypatch.setattr(fused_cpu, "fused_cpu_adopt", lambda *a, **k: calls.append(1) or real(*a, **k))

    def used_fused(**kw) -> bool:
        calls.clear()
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        adoptim.ADOPT([p], **kw).step()
        return bool(calls)

    assert used_fused()  # neither flag: fused on the CPU
    assert used_fused(fused=True)
    assert not used_fused(foreach=False) and not used_fused(foreach=True)
    assert not used_fused(fused=False) and not used_fused(differentiable=True)


def test_fallback_without_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_cpu, "_load", lambda: (None, "the compiled library is missing"))
    fused_cpu.library.cache_clear()
    try:
        assert not functional.default_fused([torch.zeros(1)], differentiable=False)
        params = hard_params(torch.float64)
        grads = hard_grads(params, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, _ = run_adopt(params, grads, fused=True, lr=0.01)
        assert len([w for w in caught if "fused CPU kernel is unavailable" in str(w.message)]) == 1
        want, _ = run_adopt(params, grads, foreach=True, lr=0.01)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    finally:
        fused_cpu.library.cache_clear()


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_extension_is_built() -> None:
    # With a compiler present the installation must have built the kernel (else every fused test
    # above would silently skip); the warning path is the one tested just above.
    assert fused_cpu.is_available()


@pytest.mark.slow
def test_failed_build_still_installs(tmp_path: Path) -> None:
    env = {**os.environ, "CC": "false", "LDSHARED": "false"}  # a compiler that always fails
    out = subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "fused CPU kernel was not built" in out.stderr
    assert not list((tmp_path / "lib").rglob("_adopt_cpu*"))


@needs_kernel
def test_bound_kernel_arithmetic() -> None:
    g = torch.Generator().manual_seed(8)
    p, gr, m, v = (torch.randn(1000, generator=g) for _ in range(4))
    want = (p - 1e-3 * gr, 0.5 * m + gr, 0.5 * v + gr)
    bandwidth_bound(p, gr, m, v)
    for a, b in zip((p, m, v), want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        bandwidth_bound(p.double(), gr, m, v)


def test_compiled_step_with_fused_on_cpu_traces_foreach() -> None:
    # The C call cannot be traced: under torch.compile an explicit fused=True on the CPU runs the traced
    # foreach kernel, which must still match the for-loop kernel (float32: a few ulps per step).
    torch._dynamo.reset()  # the graphs other tests cached for optimizer steps count toward dynamo's limit
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8))
    q = p.detach().clone().requires_grad_(True)
    fused = adoptim.ADOPT([p], lr=torch.tensor(0.01), fused=True)
    loop = adoptim.ADOPT([q], lr=torch.tensor(0.01), foreach=False)
    step = torch.compile(fused.step, fullgraph=True)
    for _ in range(4):
        g = torch.randn(8)
        p.grad, q.grad = g.clone(), g.clone()
        step()
        loop.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert float(fused.state[p]["step"]) == 4


def _lists(params: list[torch.Tensor], step_dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    return [params, grads, [torch.zeros_like(p) for p in params], [torch.ones_like(p) for p in params],
            [torch.tensor(float(i), dtype=step_dtype) for i in range(len(params))]]


def test_whole_list_table_equals_the_per_tensor_table() -> None:
    # The common case is built a whole list at a time; the per-tensor loop is the general builder.
    # Both must give the C call the same table, for every dtype and step dtype the loops take.
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for step_dtype in (torch.float32, torch.float64):
            lists = _lists([torch.zeros(n, dtype=dtype) for n in (3, 0, 70_000)] + [torch.zeros(2, 5, dtype=dtype)],
                           step_dtype)
            bulk = fused_cpu._bulk_table(*lists)
            fast, rows = fused_cpu._table_per_tensor(*lists)
            assert fast == [0, 1, 2, 3]
            assert bulk is not None and bulk.tolist() == [x for row in rows for x in row]
    # Mixed dtypes in one list (the usual single dtype takes a shortcut for the codes).
    lists = _lists([torch.zeros(3, dtype=torch.float64), torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16)])
    lists[4][1] = lists[4][1].double()
    bulk = fused_cpu._bulk_table(*lists)
    fast, rows = fused_cpu._table_per_tensor(*lists)
    assert fast == [0, 1, 2] and len(set(rows[-1])) == 3
    assert bulk is not None and bulk.tolist() == [x for row in rows for x in row]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda ls: [x.__setitem__(1, torch.zeros(2, 4, dtype=torch.complex64)) for x in ls[:4]],  # complex
        lambda ls: ls[1].__setitem__(1, torch.zeros(4, 2).t()),  # a gradient of another layout
        lambda ls: ls[2].__setitem__(0, torch.zeros(3, dtype=torch.float64)),  # state of another dtype
        lambda ls: ls[3].__setitem__(0, torch.zeros(4)),  # state of another shape
        lambda ls: ls[4].__setitem__(0, torch.zeros(1, dtype=torch.int64)),  # an integer step
        lambda ls: ls[0].__setitem__(0, torch.zeros(3, device="meta")),  # not on the CPU
    ],
)
def test_whole_list_table_leaves_unusual_tensors_to_the_per_tensor_loop(spoil) -> None:
    lists = _lists([torch.zeros(3), torch.zeros(2, 4)])
    assert fused_cpu._bulk_table(*lists) is not None
    spoil(lists)
    assert fused_cpu._bulk_table(*lists) is None


@needs_kernel
@pytest.mark.parametrize("step", [0, 1, 5])
@pytest.mark.parametrize("hyper", [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                                   dict(lr=1e3, grad_scale=4.0)], ids=["plain", "coupled", "decoupled", "large-scaled"])
def test_float16_through_f16c_equals_the_portable_conversions(step: int, hyper: dict) -> None:
    # On x86-64 CPUs with F16C, float16 is widened and narrowed by the CPU's conversion instructions;
    # elsewhere by integer arithmetic. The two must give the same bits for every float16 value
    # (subnormals, infinities, signed zeros; NaN only as NaN, whose payload neither keeps).
    lib = fused_cpu.library()
    before = lib.adopt_cpu_f16c(-1)
    if not lib.adopt_cpu_f16c(1):
        lib.adopt_cpu_f16c(before)
        pytest.skip("this CPU has no F16C")
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    gen = torch.Generator().manual_seed(step)
    p, g, m, v = (every[torch.randperm(every.numel(), generator=gen)] for _ in range(4))
    v = v.abs()
    hyper = dict(hyper)
    scale = hyper.pop("grad_scale", None)
    kw = dict(lr=0.01, weight_decay=0.0, decoupled_weight_decay=False) | hyper
    results = []
    try:
        for path in (1, 0):
            assert lib.adopt_cpu_f16c(path) == path
            state = [p.clone(), m.clone(), v.clone(), torch.tensor(float(step))]
            left = fused_cpu.fused_cpu_adopt(
                [state[0]], [g], [state[1]], [state[2]], [state[3]],
                Hyper(grad_scale=None if scale is None else torch.tensor(scale), beta1=0.9, beta2=0.999,
                      clip_exponent=0.25, eps=1e-3, maximize=False, **kw),
            )
            assert not left  # the C loops took it
            results.append(state[:3])
    finally:
        lib.adopt_cpu_f16c(before)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), *results, strict=True):
        nan = a.isnan() & b.isnan()
        differ = (a.view(torch.int16) != b.view(torch.int16)) & ~nan
        assert not differ.any(), f"{name}: {int(differ.sum())} values differ"
    if step == 0:  # the first call changes only v: every bit of p and m stays, NaN payloads included
        assert torch.equal(results[0][0].view(torch.int16), p.view(torch.int16))
        assert torch.equal(results[0][1].view(torch.int16), m.view(torch.int16))


_FIND_GOMP = r"""
import ctypes, sys
from array import array
kernel, torch_lib, load = sys.argv[1], sys.argv[2], sys.argv[3:]
ctypes.CDLL(torch_lib)  # stands in for torch's libtorch_cpu
for path in load:
    ctypes.CDLL(path)  # a libgomp, as torch would load it (locally, under its own name)
lib = ctypes.CDLL(kernel)
found = lib.adopt_cpu_openmp(-1)
n = 200_000  # one region on two threads through whichever runtime was found
p, g, m, v = (array("f", [x] * n) for x in (1.0, 2.0, 4.0, 8.0))
lib.adopt_bench_bandwidth_bound(*(ctypes.c_void_p(a.buffer_info()[0]) for a in (p, g, m, v)), ctypes.c_int64(n), 2)
ok = all(abs(x - 0.998) < 1e-6 for x in p) and set(m) == {4.0} and set(v) == {6.0}  # p - 1e-3 g, m / 2 + g, v / 2 + g
print(found, ok)
"""


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lookup of torch's libgomp is for Linux")
def test_torch_libgomp_is_found_under_a_hashed_name_beside_libtorch(tmp_path: Path) -> None:
    # Some torch wheels carry libgomp as torch/lib/libgomp-<hash>.so.1 (its soname renamed too), so a
    # lookup by the name libgomp.so.1 misses it. The kernel takes the libgomp loaded from libtorch_cpu's
    # directory, and no other: one loaded from elsewhere under another name is not torch's.
    patchelf, cc = shutil.which("patchelf"), shutil.which("cc") or shutil.which("gcc")
    maps = Path("/proc/self/maps").read_text().split("\n")
    gomp = sorted({line.split()[-1] for line in maps if "/libgomp" in line})
    if not (patchelf and cc and gomp):
        pytest.skip("needs patchelf, a C compiler and a libgomp loaded by torch")
    kernel = importlib.util.find_spec("adoptim.kernels._adopt_cpu").origin
    torch_dir, other_dir = tmp_path / "torch" / "lib", tmp_path / "elsewhere"
    for d in (torch_dir, other_dir):
        d.mkdir(parents=True)
    (tmp_path / "stub.c").write_text("int adoptim_stub;\n")
    torch_lib = torch_dir / "libtorch_cpu.so"
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "stub.c"), "-o", str(torch_lib)], check=True)
    copies = {}
    for d, name in ((torch_dir, "libgomp-0a1b2c3d.so.1"), (other_dir, "libgomp-99ee88ff.so.1")):
        copies[d] = d / name
        shutil.copy(gomp[0], copies[d])
        subprocess.run([patchelf, "--set-soname", name, str(copies[d])], check=True)

    def run(*load: Path) -> str:
        out = subprocess.run([sys.executable, "-c", _FIND_GOMP, kernel, str(torch_lib), *map(str, load)],
                             capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip()

    assert run(copies[torch_dir]) == "1 True"  # torch's, under a hashed name: found, and a region runs
    assert run(copies[other_dir]) == "0 True"  # another directory's: not torch's; threads per call
    assert run() == "0 True"  # none loaded: threads per call


@needs_kernel
@pytest.mark.parametrize("openmp", [True, False], ids=["torch-openmp-threads", "threads-per-call"])
def test_two_python_threads_stepping_at_once_get_their_sequential_results(openmp: bool) -> None:
    # ctypes releases the GIL during the C call, so two optimizers in two Python threads run their
    # parallel steps at the same time (each host thread gets its own OpenMP team).
    def make(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        g = torch.Generator().manual_seed(seed)
        params = [torch.randn(150_000, generator=g).requires_grad_(True) for _ in range(2)]
        return params, [[torch.randn(150_000, generator=g) for _ in params] for _ in range(10)]

    def run(params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        opt = adoptim.ADOPT(params, lr=0.01, fused=True)
        for row in grads:
            for p, g in zip(params, row):
                p.grad = g
            opt.step()
        return [p.detach() for p in params]

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _threading(openmp):
            alone = [run(*make(seed)) for seed in (1, 2)]
            together: list = [None, None]
            threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, run(*make(i + 1))))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(alone, together, strict=True):
        assert b is not None and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@needs_kernel
def test_the_default_threads_are_torchs_openmp_threads_where_torch_loaded_libgomp() -> None:
    maps = Path("/proc/self/maps")
    torch_dir = str(Path(torch.__file__).parent / "lib")
    loaded = maps.exists() and any("/libgomp" in line and torch_dir in line for line in maps.read_text().split("\n"))
    if not (loaded and "OpenMP" in torch.__config__.parallel_info()):
        pytest.skip("torch does not run on its own libgomp here")
    lib = fused_cpu.library()
    before = lib.adopt_cpu_openmp(-1)
    try:
        lib.adopt_cpu_openmp(1)
        assert lib.adopt_cpu_openmp(-1) == 1  # found
    finally:
        lib.adopt_cpu_openmp(before)
    assert before == 1  # and chosen by default (no test leaves it switched off)


@needs_kernel
def test_wider_state_goes_to_the_for_loop_kernel_and_narrower_state_is_refused_before_anything_changes() -> None:
    # A model cast after some steps keeps its state's dtype. Wider state (float64 state of a float32
    # parameter) is updated by the for-loop kernel in the same call, by type promotion; narrower state
    # would fail inside it, so the call refuses it first, naming the tensor.
    from adoptim.kernels.single_tensor import single_tensor_adopt

    hyper = dict(beta1=0.9, beta2=0.99, lr=0.01, weight_decay=0.1, decoupled_weight_decay=False,
                 clip_exponent=0.25, eps=1e-6, maximize=False, capturable=False, differentiable=False)
    gen = torch.Generator().manual_seed(21)

    def lists() -> list[list[torch.Tensor]]:
        gen.manual_seed(21)
        params = [torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen)]
        state = [torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(2)]
        state += [torch.rand(5, generator=gen, dtype=torch.float64) for _ in range(2)]  # wider than p[1]
        return [params, [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params],
                [state[0], state[2]], [state[1], state[3]], [torch.tensor(3.0), torch.tensor(3.0)]]

    alone = lists()
    assert fused_cpu.fused_cpu_adopt(*alone, Hyper(**hyper)) == [1]  # the kernel leaves tensor 1
    assert torch.equal(alone[0][1], lists()[0][1]) and not torch.equal(alone[0][0], lists()[0][0])
    fused, loop = lists(), lists()
    functional.run_fused_kernel(fused_cpu.fused_cpu_adopt, fused, Hyper(**hyper))  # as the dispatcher runs it
    single_tensor_adopt(*loop, Hyper(**hyper))
    for f, lp in zip(fused, loop):
        # Tensor 0 went through the C loops (float64, a few ulps from the for-loop's rounding), tensor 1
        # through the for-loop kernel itself: the same bits.
        torch.testing.assert_close(f[0], lp[0], rtol=1e-13, atol=1e-15)
        assert f[1].dtype == lp[1].dtype and torch.equal(f[1], lp[1])
    assert fused[2][1].dtype == torch.float64 and not torch.equal(fused[2][1], lists()[2][1])

    narrow = lists()
    narrow[0][1], narrow[1][1] = narrow[0][1].double(), narrow[1][1].double()
    narrow[3][1] = narrow[3][1].float()  # exp_avg_sq of tensor 1 narrower than its float64 parameter
    before = [x.clone() for x in sum(narrow, [])]
    with pytest.raises(ValueError, match=r"tensor 1: exp_avg \(torch.float64\) and exp_avg_sq \(torch.float32\)"):
        fused_cpu.fused_cpu_adopt(*narrow, Hyper(**hyper))
    assert all(torch.equal(a, b) for a, b in zip(sum(narrow, []), before))  # tensor 0 included


def _conjugate_phase_run(shape: tuple, extra_complex: bool, **kernel: object) -> torch.Tensor:
    """A real parameter used as the imaginary part of a conjugated complex number: autograd leaves its
    gradient as a lazy negation (is_neg() is True, memory holds the value's negative)."""
    torch.manual_seed(0)
    x = torch.randn(8, dtype=torch.complex128)
    p = torch.nn.Parameter(torch.full(shape, 0.5, dtype=torch.float64))
    params = [p] + ([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128))] if extra_complex else [])
    opt = adoptim.ADOPT(params, lr=0.1, **kernel)
    for _ in range(3):
        opt.zero_grad()
        loss = (torch.complex(torch.ones(shape, dtype=torch.float64), p).conj() * x).real.sum()
        if extra_complex:  # a complex parameter sends the call down the per-tensor path
            loss = loss + (params[1] * x[:2]).abs().sum()
        loss.backward()
        assert p.grad.is_neg()
        opt.step()
    return p.detach()


@needs_kernel
@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("extra_complex", [False, True], ids=["whole-list", "per-tensor"])
def test_lazily_negated_gradient_is_read_with_its_sign(shape: tuple, extra_complex: bool) -> None:
    fused = _conjugate_phase_run(shape, extra_complex, fused=True)
    loop = _conjugate_phase_run(shape, extra_complex, foreach=False)
    torch.manual_seed(0)
    slope = float(torch.randn(8, dtype=torch.complex128).imag.sum())  # d loss / d p, the same x as the run
    assert torch.equal(fused, loop) and (float(fused.reshape(-1)[0]) - 0.5) * slope < 0  # it went downhill


@needs_kernel
@pytest.mark.parametrize("extra_complex", [False, True], ids=["whole-list", "per-tensor"])
def test_a_gradient_without_memory_is_refused_with_nothing_changed(extra_complex: bool) -> None:
    p = torch.nn.Parameter(torch.ones(4))
    params = [p] + ([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))] if extra_complex else [])
    opt = adoptim.ADOPT(params, fused=True)
    for q in params:
        q.grad = torch.ones_like(q)
    opt.step()
    before = {id(q): {k: v.clone() for k, v in opt.state[q].items()} for q in params}
    p.grad = torch._efficientzerotensor(4)  # a ZeroTensor: elements but no memory (data_ptr() is 0)
    params[-1].grad = torch.ones_like(params[-1]) if extra_complex else p.grad
    with pytest.raises(ValueError, match="has no memory"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4))
    for q in params:
        assert all(torch.equal(opt.state[q][k], v) for k, v in before[id(q)].items())


@pytest.mark.parametrize("kernel", [{"foreach": False}, {"foreach": True}, {"fused": True},
                                    {"foreach": False, "capturable": True}, {"foreach": True, "capturable": True}],
                         ids=["forloop", "foreach", "fused", "forloop-capturable", "foreach-capturable"])
def test_float32_tensor_lr_decays_float64_parameters_in_float64(kernel: dict) -> None:
    # torch.tensor(0.1) is float32: its value is exact in float64, and so must lr * weight_decay be for
    # float64 parameters (it was rounded to float32 first in the for-loop and foreach kernels: 2.6e-7 off).
    if kernel.get("fused") and not fused_cpu.is_available():
        pytest.skip("fused CPU kernel not built")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=gen, dtype=torch.float64) * 10
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(12)]
    p = torch.nn.Parameter(base.clone())
    lr = torch.tensor(0.1)
    opt = adoptim.ADOPT([p], lr=lr, weight_decay=0.3, decoupled_weight_decay=True, **kernel)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = run_reference([base], [[g] for g in grads], lr=float(lr), beta1=0.9, beta2=0.9999, eps=1e-6,
                        weight_decay=0.3, decoupled_weight_decay=True)
    torch.testing.assert_close(p.detach(), ref.params()[0], rtol=1e-13, atol=1e-13)
