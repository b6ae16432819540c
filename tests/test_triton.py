"""The Triton kernel run on CPU tensors through Triton's interpreter, against the float64 reference.

Triton picks the interpreter when a kernel is decorated (and again when the interpreter first runs a
helper it calls), so this module loads its own copy of ``adoptim.kernels.triton`` with
``TRITON_INTERPRET=1`` set for that import and, through a fixture, for each of its tests only: other
tests in the same worker (the CUDA and compile tests) keep the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch
from capabilities import FLAG_COMBOS
from optim_helpers import hard_grads, hard_params, run_reference

import adoptim.kernels
from adoptim import functional
from adoptim.kernels import facts
from adoptim.kernels.contract import Hyper, KernelPlan
from adoptim.kernels.single_tensor import single_tensor_adopt

triton = pytest.importorskip("triton")

HYPER = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6)


def _load_interpreted() -> ModuleType:
    path = os.path.join(os.path.dirname(adoptim.kernels.__file__), "triton.py")
    spec = importlib.util.spec_from_file_location("_adoptim_triton_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


K = _load_interpreted()


def triton_adopt(*lists: list[torch.Tensor], **hyper: object) -> None:
    """The interpreted Triton kernel run as the dispatcher runs a fused kernel: what it leaves goes to the
    for-loop kernel in the same call."""
    functional.run_fused_kernel(K.triton_adopt, lists, Hyper(**hyper))


def loop_adopt(*lists: list[torch.Tensor], **hyper: object) -> None:
    """The for-loop kernel, the ground truth."""
    single_tensor_adopt(*lists, Hyper(**hyper))

# Small blocks keep the interpreter fast; two blocks per chunk exercise the loop inside a chunk (the
# GPU default has one).
K._BLOCK, K._CHUNK = 512, 1024
_ENV_AFTER_LOAD = os.environ.get("TRITON_INTERPRET")


class State:
    """Parameters and ADOPT state kept by a test, stepped by any kernel with the functional signature."""

    def __init__(self, params: list[torch.Tensor], step_dtype: torch.dtype = torch.float32) -> None:
        self.p = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.s = [torch.zeros((), dtype=step_dtype) for _ in params]

    def step(self, kernel, grads: list[torch.Tensor | None], **kw: object) -> None:
        idx = [i for i, g in enumerate(grads) if g is not None]
        pick = lambda xs: [xs[i] for i in idx]
        kernel(pick(self.p), pick(grads), pick(self.m), pick(self.v), pick(self.s), **kw)


def _fused(**hyper: object) -> dict[str, object]:
    return dict(grad_scale=None, found_inf=None, capturable=False, differentiable=False, **hyper)


def _plain(**hyper: object) -> dict[str, object]:
    return dict(capturable=False, differentiable=False, **hyper)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_the_interpreter_does_not_leak() -> None:
    assert type(K._adopt_kernel).__name__ == "InterpretedFunction"
    assert _ENV_AFTER_LOAD != "1"


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_float64_matches_reference_on_hard_cases(flags: dict) -> None:
    params = hard_params(torch.float64)
    grads = hard_grads(params, steps=8)
    hyper = {**HYPER, **flags}
    ref = run_reference(params, grads, **hyper)
    st = State(params)
    for row in grads:
        st.step(triton_adopt, row, **_fused(**hyper))
    # The same float64 operations as the reference, up to fused multiply-adds and the order of two
    # roundings: a few ulps after 8 steps of values of order 1.
    for i, p in enumerate(st.p):
        torch.testing.assert_close(p, ref.params()[i], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(st.m[i], ref.exp_avg(i), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(st.v[i], ref.exp_avg_sq(i), rtol=1e-13, atol=1e-14)
    assert [int(s) for s in st.s] == ref.steps() == [8, 8, 4, 8, 8]


@pytest.mark.parametrize("flags", FLAG_COMBOS[::3], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_float32_matches_forloop_kernel(flags: dict) -> None:
    params = hard_params(torch.float32)
    grads = hard_grads(params, steps=8)
    hyper = {**HYPER, **flags}
    fused, loop = State(params), State(params)
    for row in grads:
        fused.step(triton_adopt, row, **_fused(**hyper))
        loop.step(loop_adopt, row, **_plain(**hyper))
    # float32 arithmetic in both; the for-loop kernel rounds after each tensor op while the fused one
    # keeps g + wd*p, the decay and lr*m in registers, so they differ by a few float32 ulps per step.
    for a, b, ma, mb, va, vb in zip(fused.p, loop.p, fused.m, loop.m, fused.v, loop.v):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7)
    assert [int(s) for s in fused.s] == [int(s) for s in loop.s]


def _random_state(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g, dtype=torch.float64)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * torch.randn(n, generator=g, dtype=torch.float64).exp()
    m = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    v = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return tuple(x.to(dtype) for x in (p, grad, m, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [0, 1, 7])
@pytest.mark.parametrize("decoupled", [False, True])
def test_low_precision_step_is_the_reference_rounded_once(dtype: torch.dtype, step: int, decoupled: bool) -> None:
    from adoptim.reference import adopt_step

    p, g, m, v = _random_state(dtype, 3000, seed=step)
    hyper = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=decoupled, clip_exponent=0.25, maximize=False)
    pp, mm, vv = p.clone(), m.clone(), v.clone()
    s = torch.tensor(float(step))
    triton_adopt([pp], [g], [mm], [vv], [s], **_fused(**hyper))
    flat = lambda t: t.double().tolist()
    rp, rm, rv, _ = adopt_step(flat(p), flat(g), flat(m), flat(v), step, **hyper)
    # The kernel computes in float32 and rounds once to the parameter's dtype. float32 differs from the
    # float64 reference by ~1e-7 relative, far below the dtype's half-ulp, so the result is the correctly
    # rounded reference except where it lies within that distance of a rounding boundary: one ulp.
    ulp = torch.finfo(dtype).eps
    for out, ref in ((pp, rp), (mm, rm), (vv, rv)):
        ref_t = torch.tensor(ref, dtype=torch.float64)
        # Subnormal results have a fixed spacing instead: one of those is allowed as well.
        tiny = torch.finfo(dtype).smallest_normal * ulp
        torch.testing.assert_close(out.double(), ref_t.to(dtype).double(), rtol=ulp, atol=tiny)
        exact = (out == ref_t.to(dtype)).double().mean().item()
        assert exact > 0.99, f"only {exact:.3f} of the elements are the correctly rounded reference"
    assert float(s) == step + 1


def _count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    grids: list[int] = []
    kernel = K._adopt_kernel

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return kernel[grid]

    monkeypatch.setattr(K, "_adopt_kernel", Counting())
    return grids


def test_many_tensors_of_many_sizes_take_one_launch_per_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 7, 2047, 2048, 2049, K._CHUNK - 1, K._CHUNK, K._CHUNK + 5, 2 * K._CHUNK + 300, 0, 33] * 3
    params = [torch.randn(n, generator=gen, dtype=torch.float32) for n in sizes]
    params += [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, K._CHUNK + 1)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(3)]
    fused, loop = State(params), State(params)
    grids = _count_launches(monkeypatch)
    for row in grads:
        fused.step(triton_adopt, row, **_fused(**HYPER, weight_decay=0.0, decoupled_weight_decay=False,
                                                  clip_exponent=0.25, maximize=False))
        loop.step(loop_adopt, row, **_plain(**HYPER, weight_decay=0.0, decoupled_weight_decay=False,
                                                     clip_exponent=0.25, maximize=False))
    chunks32 = sum(-(-n // K._CHUNK) for n in sizes)
    assert grids == [chunks32, 3] * 3  # one launch per dtype and step, one program per chunk
    for a, b in zip(fused.p, loop.p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(float(s) == 3 for s in fused.s)


def test_launch_plans_are_built_once_per_set_of_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    plan = K._plan
    monkeypatch.setattr(K, "_plan", lambda *a: builds.append(1) or plan(*a))
    st = State([torch.randn(10), torch.randn(5)])
    grads = [torch.randn(10), torch.randn(5)]
    kw = _fused(**HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    st.step(triton_adopt, grads, **kw)
    st.step(triton_adopt, grads, **kw)
    assert len(builds) == 1  # the same tensors again: the cached plan is reused
    st.step(triton_adopt, [g.clone() for g in grads], **kw)
    assert len(builds) == 2  # new gradient tensors: a new plan
    transposed = [torch.randn(5, 2).t(), torch.randn(5)]  # not the parameter's layout: copied, never cached
    st2 = State([torch.randn(2, 5), torch.randn(5)])
    st2.step(triton_adopt, transposed, **kw)
    st2.step(triton_adopt, transposed, **kw)
    assert len(builds) == 4 and not K._KEEP_ALIVE


def test_a_cached_plan_is_not_reused_for_another_layout_at_the_same_address() -> None:
    # The same gradient memory read first as it lies, then transposed: the address, size and dtype
    # are the same, only the strides differ, and the update must follow them.
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    buf = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    kw = dict(HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    fused, loop = State([p]), State([p])
    for g in (buf, buf, buf.t(), buf.t(), buf):
        fused.step(triton_adopt, [g], **_fused(**kw))
        loop.step(loop_adopt, [g], **_plain(**kw))
        torch.testing.assert_close(fused.p[0], loop.p[0], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(fused.v[0], loop.v[0], rtol=1e-14, atol=1e-15)


def test_cached_plans_follow_every_move_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every event here moves memory or changes a tensor under the same Python object without changing a
    # value the update reads, so the trajectory must stay the for-loop kernel's; a stale address table
    # would write into freed memory.
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64),
              torch.randn(1, 6, generator=gen, dtype=torch.float64)]
    kw = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=0.25, maximize=False)
    fused, loop = State(params), State(params)
    builds = []
    real = K._plan
    monkeypatch.setattr(K, "_plan", lambda *a: builds.append(1) or real(*a))
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for t in range(9):
        new = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        if t in (1, 2, 3, 6):
            for g, x in zip(grads, new):
                g.copy_(x)  # the same gradient tensors, updated in place
        elif t == 4:
            grads[0].copy_(new[0])
            grads = [grads[0].view(4, 3).t(), grads[1], grads[2]]  # the same address, read with other strides
        elif t == 7:
            # contiguous, but with another stride in the size-1 dimension than the parameter (as autograd
            # makes for a (1, n) parameter used transposed): the same order of elements
            grads = [new[0], new[1], new[2].t().contiguous().t()]
        else:
            grads = new  # new gradient tensors
        if t == 3:
            fused.p[1].data = fused.p[1].data.clone()  # the same parameter object, another address
        if t == 5:
            fused.m = [m.clone() for m in fused.m]  # new state tensors, as load_state_dict makes
        if t == 6:
            fused.v[0].data = fused.v[0].data.clone()  # the same state object, another address
            fused.s[1].data = fused.s[1].data.clone()
        fused.step(triton_adopt, grads, **_fused(**kw))
        loop.step(loop_adopt, grads, **_plain(**kw))
        for a, b in zip(fused.p + fused.m + fused.v + fused.s, loop.p + loop.m + loop.v + loop.s):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    # Built at 0, 3 (a parameter's new storage), 4 (other strides), 5 (new state), 6 (moved state), 7 and
    # 8 (new gradients); the in-place gradients of steps 1 and 2 reused the plan of step 0.
    assert len(builds) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_found_inf_changes_nothing_and_grad_scale_unscales(dtype: torch.dtype) -> None:
    params = hard_params(dtype)
    grads = hard_grads(params, steps=4)
    hyper = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    ref = run_reference(params, grads, **hyper)
    st = State(params)
    scale = torch.tensor(1024.0)  # a power of two: scaling and unscaling are exact
    for row in grads:
        before = [x.clone() for x in st.p + st.m + st.v + st.s]
        poisoned = [None if g is None else g * scale for g in row]
        if poisoned[1] is not None:
            poisoned[1] = poisoned[1].clone()
            poisoned[1].view(-1)[0] = float("inf")
        st.step(triton_adopt, poisoned, **_fused(**hyper) | dict(grad_scale=scale, found_inf=torch.tensor(1.0)))
        after = st.p + st.m + st.v + st.s
        for x, y in zip(before, after):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=False)
        scaled = [None if g is None else g * scale for g in row]
        st.step(triton_adopt, scaled, **_fused(**hyper) | dict(grad_scale=scale, found_inf=torch.tensor(0.0)))
    for i, p in enumerate(st.p):
        tol = dict(rtol=1e-13, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.to(torch.float64 if not p.is_complex() else torch.complex128),
                                   ref.params()[i], **tol)
    assert [int(s) for s in st.s] == ref.steps()


def test_tensor_lr_equals_float_lr() -> None:
    params = hard_params(torch.float64)
    grads = hard_grads(params, steps=5)
    hyper = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=None, maximize=True)
    a, b = State(params), State(params)
    for row in grads:
        a.step(triton_adopt, row, **_fused(**hyper))
        b.step(triton_adopt, row, **_fused(**hyper) | dict(lr=torch.tensor(hyper["lr"], dtype=torch.float64)))
    for x, y in zip(a.p, b.p):
        torch.testing.assert_close(x, y, rtol=1e-15, atol=1e-16)


def test_channels_last_parameter_and_gradient_of_another_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last)
    grads = [torch.randn(2, 3, 4, 5, generator=gen) for _ in range(3)]  # contiguous, unlike p
    hyper = dict(HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    fused, loop = State([p]), State([p.contiguous()])
    for g in grads:
        fused.step(triton_adopt, [g], **_fused(**hyper))
        loop.step(loop_adopt, [g], **_plain(**hyper))
    assert fused.p[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused.p[0], loop.p[0], rtol=1e-6, atol=1e-6)


def test_bad_input_is_named() -> None:
    kw = _fused(**HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    p, g, m, v, s = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.zeros(4), torch.zeros(())
    with pytest.raises(ValueError, match="same length"):
        triton_adopt([p], [g], [m, m], [v], [s], **kw)
    with pytest.raises(ValueError, match="int64"):
        triton_adopt([p.long()], [g.long()], [m], [v], [s], **kw)
    with pytest.raises(ValueError, match="gradient 0"):
        triton_adopt([p], [torch.ones(2, 2)], [m], [v], [s], **kw)
    with pytest.raises(ValueError, match="exp_avg_sq of parameter 1"):
        triton_adopt([p, p.clone()], [g, g], [m, m.clone()], [v, torch.zeros(5)], [s, s.clone()], **kw)
    with pytest.raises(ValueError, match="exp_avg of parameter 0 .* its dtype or a wider one: torch.float32"):
        triton_adopt([p.double()], [g.double()], [m], [v.double()], [s], **kw)  # narrower state
    assert float(s) == 0 and torch.equal(p, torch.zeros(4)) and torch.equal(m, torch.zeros(4))  # nothing ran


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
def test_tensors_the_kernel_cannot_take_go_to_the_forloop_kernel_in_the_same_call(found_inf) -> None:
    # A gradient of another dtype (grad_dtype), state of another layout (a model made channels_last after
    # its first step), a parameter that is not dense, wider state (a model cast to float32 after steps
    # in float64): the for-loop kernel updates these in the same call, so a step never stops half-way.
    gen = torch.Generator().manual_seed(13)
    shapes = [(10,), (2, 3, 4, 5), (6,), (7,), (5,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    kw = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)

    def setup() -> list[list[torch.Tensor]]:
        params = [x.clone() for x in init]
        params[1] = params[1].to(memory_format=torch.channels_last)  # its state stays contiguous
        buf = torch.zeros(6, 2, dtype=torch.float64)
        buf[:, 0] = init[2]
        params[2] = buf[:, 0]  # not dense
        params[4] = params[4].float()  # its state stays float64
        m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        return [params, m, [x.clone() for x in m], [torch.zeros((), dtype=torch.float64) for _ in shapes]]

    fused, loop = setup(), setup()
    scale = torch.tensor(4.0)  # a power of two: scaling and unscaling are exact
    inf = None if found_inf is None else torch.tensor(found_inf)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        grads[3] = grads[3].float()  # another dtype than the parameter's
        grads[4] = grads[4].float()  # the parameter's dtype, narrower than its state's
        triton_adopt(fused[0], [g * scale for g in grads], *fused[1:],
                       **_fused(**kw) | dict(grad_scale=scale, found_inf=inf))
        if found_inf != 1.0:
            loop_adopt(loop[0], grads, *loop[1:], **_plain(**kw))
    for a, b in zip(sum(fused, []), sum(loop, [])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert [float(x) for x in fused[3]] == [0.0 if found_inf == 1.0 else 3.0] * len(shapes)


def test_a_tensor_listed_twice_takes_its_updates_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # The programs of one launch would race on a tensor listed twice; the for-loop kernel gives the two
    # updates in order. Empty tensors may share an address without being the same tensor.
    kw = dict(HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    gen = torch.Generator().manual_seed(12)
    p, g = torch.randn(3000, generator=gen, dtype=torch.float64), torch.randn(3000, generator=gen, dtype=torch.float64)
    fused = [p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.float64)]
    loop = [p.clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), dtype=torch.float64)]
    for _ in range(3):
        x, m, v, s = fused
        triton_adopt([x, x], [g, g], [m, m], [v, v], [s, s], **_fused(**kw))
        x, m, v, s = loop
        loop_adopt([x, x], [g, g], [m, m], [v, v], [s, s], **_plain(**kw))
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(fused[3]) == 6
    calls = []
    monkeypatch.setattr(functional, "single_tensor_adopt", lambda *a, **k: calls.append(1))
    empty = [torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]
    triton_adopt(empty, [torch.zeros(0, dtype=torch.float64)] * 2, [x.clone() for x in empty],
                   [x.clone() for x in empty], [torch.zeros((), dtype=torch.float64) for _ in empty], **_fused(**kw))
    assert not calls  # two empty tensors are not a repeat, whatever their addresses


def test_parameters_sharing_memory_go_to_the_for_loop_kernel_and_disjoint_views_do_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Overlapping views of one buffer would be updated by two programs of one launch at once on a GPU
    # (the interpreter runs programs one by one, so the routing is what this checks); disjoint views,
    # a flat buffer cut into parameters, keep the kernel.
    kw = dict(HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=None, maximize=False)
    calls: list[int] = []
    real = loop_adopt
    monkeypatch.setattr(functional, "single_tensor_adopt",
                        lambda p, *a: (calls.append(len(p)), single_tensor_adopt(p, *a))[1])
    gen = torch.Generator().manual_seed(13)
    init = torch.randn(3000, generator=gen, dtype=torch.float64)
    grads = [torch.randn(2000, generator=gen, dtype=torch.float64) for _ in range(2)]
    for cut, routed in (((slice(0, 2000), slice(1000, 3000)), True), ((slice(0, 1000), slice(1000, 3000)), False)):
        calls.clear()
        results = []
        for kernel in (triton_adopt, real):
            buf = init.clone()
            params = [buf[c] for c in cut]
            state = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                     [torch.zeros((), dtype=torch.float64) for _ in params]]
            for _ in range(3):
                g = [x[: p.numel()] for x, p in zip(grads, params)]
                if kernel is real:
                    real(params, g, *state, **_plain(**kw))
                else:
                    kernel(params, g, *state, **_fused(**kw))
            results.append(buf)
        assert calls == ([2] * 3 if routed else []), cut
        torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("clip_exponent", [0.25, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_gradients_propagate_as_in_the_forloop_kernel(clip_exponent, dtype: torch.dtype) -> None:
    # Triton's maximum and minimum return the operand that is not NaN unless told otherwise: a NaN
    # gradient became a finite, clipped update of m and p (and eps the normaliser of every later call),
    # where torch.clamp and the reference keep the NaN. Element 1 gets NaN, element 2 inf (and then
    # inf / inf), on the first call of tensor 0 and a later call of tensor 1; then finite gradients.
    kw = dict(HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=clip_exponent, maximize=False)
    bad = torch.tensor([0.5, float("nan"), float("inf"), -0.25], dtype=dtype)
    good = torch.tensor([0.5, 0.5, -0.5, 0.25], dtype=dtype)

    def state(step: float) -> list[torch.Tensor]:
        v = 0.25 if step else 0.0  # a first call starts from v = 0, as the optimizer creates it
        return [torch.ones(4, dtype=dtype), torch.zeros(4, dtype=dtype), torch.full((4,), v, dtype=dtype),
                torch.tensor(step, dtype=dtype)]

    # The finite values: a few roundings of the dtype apart (the kernel's sums are ordered differently).
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    fused, loop = [state(0.0), state(3.0)], [state(0.0), state(3.0)]
    for grad in (bad, good, bad, good):
        for lists, kernel, extra in ((fused, triton_adopt, _fused(**kw)), (loop, loop_adopt, _plain(**kw))):
            p, m, v, s = ([t[i] for t in lists] for i in range(4))
            kernel(p, [grad, grad], m, v, s, **extra)
        for a, b in zip(sum(fused, []), sum(loop, [])):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            finite = a.isfinite()
            torch.testing.assert_close(a[finite], b[finite], **tol)
    assert fused[0][0][1].isnan() and fused[1][0][1].isnan()  # NaN reached p


def test_betas_and_weight_decay_that_change_every_step_reuse_one_compiled_kernel(monkeypatch) -> None:
    # OneCycleLR(cycle_momentum=True) writes a new beta1 at every step. The hyperparameters a schedule
    # may change are kernel arguments, not compile-time constants, so every launch has the same
    # constants (one compiled kernel on a GPU); the results follow each step's values exactly as the
    # for-loop kernel does (float64: the parts sum to the float64 value exactly).
    constants: list[dict] = []
    kernel = K._adopt_kernel

    class Recording:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                constants.append({k: v for k, v in kwargs.items() if k != "num_warps"})
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(K, "_adopt_kernel", Recording())
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (7, 1500)]
    fused, loop = State(params), State(params)
    schedule = [(0.95, 0.999, 0.1), (0.85, 0.99, 0.05), (0.3, 0.9, 0.01), (0.6, 0.5, 0.0), (0.9, 0.9999, 0.02)]
    for beta1, beta2, wd in schedule:
        row = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        hyper = dict(lr=0.05, beta1=beta1, beta2=beta2, eps=1e-6, weight_decay=wd, decoupled_weight_decay=False,
                     clip_exponent=0.25, maximize=False)
        fused.step(triton_adopt, row, **_fused(**hyper))
        loop.step(loop_adopt, row, **_plain(**hyper))
    # Only whether there is weight decay at all is a constant (wd = 0 at the fourth step).
    assert len({tuple(sorted(c.items())) for c in constants}) == 2, constants
    assert {c["HAS_WD"] for c in constants} == {True, False}
    for a, b, ma, mb, va, vb in zip(fused.p, loop.p, fused.m, loop.m, fused.v, loop.v):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ma, mb, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(va, vb, rtol=1e-13, atol=1e-14)


def test_float32_parts_sum_to_the_float64_hyperparameter_exactly() -> None:
    for x in (0.9, 0.999, 0.9999, 1 - 0.9, 1 - 0.9999, 1e-4, 0.05, 0.1 + 1e-12, 0.3, 0.0):
        hi, mid, lo = K._f32_triple(x)
        assert all(K._f32(part) == part for part in (hi, mid, lo))  # each part is a float32
        assert (hi + mid) + lo == x and hi == K._f32(x)


def test_lazily_negated_gradients_are_read_with_their_sign_even_at_a_cached_address() -> None:
    # A negated view holds -x in memory. The kernel must not read it as x: not when it first sees it,
    # and not when it comes back at the address of a plain gradient whose launch plan is cached.
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(n, generator=gen) for n in (5, 1300)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    kw = dict(**HYPER, weight_decay=0.0, decoupled_weight_decay=False, clip_exponent=0.25, maximize=False)
    fused, loop = State(params), State(params)
    for row in (grads, [torch._neg_view(g) for g in grads], grads, [grads[0], torch._neg_view(grads[1])]):
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(row, grads))  # the same addresses throughout
        fused.step(triton_adopt, row, **_fused(**kw))
        loop.step(loop_adopt, row, **_plain(**kw))
    for a, b, ma, mb in zip(fused.p, loop.p, fused.m, loop.m):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ma, mb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checked", [False, True], ids=["gradients unchecked", "gradients checked by the caller"])
def test_a_kernel_plan_keeps_the_launch_plan_and_follows_the_gradients(monkeypatch: pytest.MonkeyPatch,
                                                                       checked: bool) -> None:
    # With a KernelPlan (the caller promises the parameters and state are unchanged), the launch plan is
    # looked up by the gradients alone: the same gradients reuse it without building a key of every tensor,
    # new gradients (other addresses, another layout) get a new one, and the trajectory stays the for-loop
    # kernel's. ADOPT's kept collection also checks the gradients (kernels/facts.py) and sets the plan's
    # ``grads``; the lookup is then by their addresses.
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)]
    kw = dict(HYPER, weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=0.25, maximize=False)
    fused, loop = State(params), State(params)
    plan = KernelPlan()
    lookups = []
    real = K._cached_plan
    monkeypatch.setattr(K, "_cached_plan", lambda *a: lookups.append(1) or real(*a))
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    for t in range(6):
        if t in (2, 4):
            grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]  # new tensors
        if t == 5:
            grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64).t(), grads[1]]  # other strides
        lookups.clear()
        lists = [fused.p, grads, fused.m, fused.v, fused.s]
        if checked:
            if t == 0:
                kept = facts.kept_facts(fused.p, fused.m, fused.v, fused.s)
                assert kept is not None
            verified = kept.check(grads)
            assert verified is (t != 5)  # the transposed gradient is left to the kernel's own checks
            plan.grads = (id(grads), kept.grad_ptrs) if verified else None
        functional.run_fused_kernel(K.triton_adopt, lists, Hyper(**_fused(**kw)), plan)
        loop_adopt(loop.p, grads, loop.m, loop.v, loop.s, **_plain(**kw))
        assert bool(lookups) == (t in (0, 2, 4, 5)), t
        for a, b in zip(fused.p + fused.m + fused.v, loop.p + loop.m + loop.v):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
