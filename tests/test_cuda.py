"""Real-GPU tests: the Triton kernel against the reference and the for-loop kernel, AMP's GradScaler,
a whole training step captured in a CUDA graph, and the fused kernel through the optimizer class.

Every test here needs CUDA and Triton and is skipped without them.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_helpers import hard_grads, hard_params, run_reference

import adoptim
from adoptim import functional
from adoptim.kernels.contract import Hyper
from adoptim.kernels.single_tensor import single_tensor_adopt
from adoptim.reference import adopt_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HYPER = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6)
FLAGS = [
    dict(weight_decay=0.1, decoupled_weight_decay=True, clip_exponent=0.25, maximize=True),
    dict(weight_decay=0.1, decoupled_weight_decay=False, clip_exponent=None, maximize=False),
]


def _kernel():
    """The Triton kernel with keyword hyperparameters, run as the dispatcher runs a fused kernel (what it
    leaves goes to the for-loop kernel in the same call)."""
    pytest.importorskip("triton")
    from adoptim.kernels.triton import triton_adopt

    return lambda *lists, **hyper: functional.run_fused_kernel(triton_adopt, lists, Hyper(**hyper))


def loop_adopt(*lists, **hyper) -> None:
    """The for-loop kernel, the ground truth."""
    single_tensor_adopt(*lists, Hyper(**hyper))


def _fused_flags() -> dict[str, bool] | None:
    """Constructor flags selecting the fused kernel, or None while the class has no such flag."""
    try:
        adoptim.ADOPT([torch.zeros(1, device="cuda", requires_grad=True)], fused=True)
    except (TypeError, ValueError):
        return None
    return {"fused": True}


class State:
    def __init__(self, params: list[torch.Tensor], capturable: bool = True) -> None:
        self.p = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        dev = params[0].device if capturable else "cpu"
        self.s = [torch.zeros((), device=dev) for _ in params]

    def step(self, kernel, grads, **kw) -> None:
        idx = [i for i, g in enumerate(grads) if g is not None]
        pick = lambda xs: [xs[i] for i in idx]
        kernel(pick(self.p), pick(grads), pick(self.m), pick(self.v), pick(self.s), **kw)


def _fused_kw(**kw):
    return dict(grad_scale=None, found_inf=None, capturable=True, differentiable=False, **HYPER, **kw)


def _cuda(rows):
    return [[None if g is None else g.cuda() for g in row] for row in rows]


@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("device_steps", [True, False])
def test_float64_matches_reference(flags: dict, device_steps: bool) -> None:
    kernel = _kernel()
    params = hard_params(torch.float64)
    grads = hard_grads(params, steps=8)
    ref = run_reference(params, grads, **HYPER, **flags)
    st = State([p.cuda() for p in params], capturable=device_steps)
    for row in _cuda(grads):
        st.step(kernel, row, **_fused_kw(**flags) | dict(capturable=device_steps))
    # float64 on both sides; FMA contraction on the GPU moves the last bits: a few ulps after 8 steps.
    for i, p in enumerate(st.p):
        torch.testing.assert_close(p.cpu(), ref.params()[i], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(st.v[i].cpu(), ref.exp_avg_sq(i), rtol=1e-13, atol=1e-14)
    assert [int(s) for s in st.s] == ref.steps()


@pytest.mark.parametrize("flags", FLAGS)
def test_float32_matches_forloop_kernel(flags: dict) -> None:
    kernel = _kernel()
    params = [p.cuda() for p in hard_params(torch.float32)]
    grads = _cuda(hard_grads(hard_params(torch.float32), steps=8))
    fused, loop = State(params), State(params)
    for row in grads:
        fused.step(kernel, row, **_fused_kw(**flags))
        loop.step(loop_adopt, row, capturable=False, differentiable=False, **HYPER, **flags)
    # Both compute in float32; the fused kernel keeps intermediates in registers (and the GPU contracts
    # multiply-adds), so they differ by a few float32 ulps per step.
    for a, b in zip(fused.p + fused.m + fused.v, loop.p + loop.m + loop.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [0, 1, 7])
def test_half_precision_is_the_reference_rounded_once(dtype: torch.dtype, step: int) -> None:
    kernel = _kernel()
    gen = torch.Generator().manual_seed(step)
    n = 50_000  # several chunks
    p, g, m = (torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(3))
    g = g * torch.randn(n, generator=gen, dtype=torch.float64).exp()
    v = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    p, g, m, v = (x.to(dtype) for x in (p, g, m, v))
    flags = FLAGS[0]
    pp, mm, vv = p.cuda(), m.cuda(), v.cuda()
    kernel([pp], [g.cuda()], [mm], [vv], [torch.tensor(float(step), device="cuda")], **_fused_kw(**flags))
    d = lambda t: t.double().tolist()
    rp, rm, rv, _ = adopt_step(d(p), d(g), d(m), d(v), step, **HYPER, **flags)
    # float32 inside the kernel is ~1e-7 from float64, far under a half-ulp of 16-bit floats: the result is
    # the correctly rounded reference but where it lies that close to a rounding boundary (one ulp).
    for out, ref in ((pp, rp), (mm, rm), (vv, rv)):
        want = torch.tensor(ref, dtype=torch.float64).to(dtype)
        fi = torch.finfo(dtype)  # subnormals have a fixed spacing: one of those is allowed as well
        torch.testing.assert_close(out.cpu().double(), want.double(), rtol=fi.eps, atol=fi.smallest_normal * fi.eps)
        assert (out.cpu() == want).double().mean() > 0.99


@pytest.mark.parametrize("device_steps", [True, False])
def test_found_inf_and_grad_scale_on_the_gpu(device_steps: bool) -> None:
    kernel = _kernel()
    params = [p.cuda() for p in hard_params(torch.float32)]
    grads = _cuda(hard_grads(hard_params(torch.float32), steps=4))
    scale = torch.tensor(4096.0, device="cuda")
    fused, loop = State(params, capturable=device_steps), State(params)
    for row in grads:
        before = [x.clone() for x in fused.p + fused.m + fused.v + fused.s]
        bad = [None if g is None else g * scale for g in row]
        bad[1] = bad[1].clone()
        bad[1].view(-1)[3] = float("nan")
        inf = torch.ones((), device="cuda")
        fused.step(kernel, bad, **_fused_kw(**FLAGS[0]) | dict(grad_scale=scale, found_inf=inf,
                                                               capturable=device_steps))
        for x, y in zip(before, fused.p + fused.m + fused.v + fused.s):
            assert torch.equal(x, y)
        good = [None if g is None else g * scale for g in row]
        fine = torch.zeros((), device="cuda")
        fused.step(kernel, good, **_fused_kw(**FLAGS[0]) | dict(grad_scale=scale, found_inf=fine,
                                                                capturable=device_steps))
        loop.step(loop_adopt, row, capturable=False, differentiable=False, **HYPER, **FLAGS[0])
    for a, b in zip(fused.p, loop.p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [float(s) for s in fused.s] == [float(s) for s in loop.s] == [4, 4, 0, 4, 4]


def test_capturable_needs_device_steps() -> None:
    kernel = _kernel()
    p = torch.zeros(3, device="cuda")
    with pytest.raises(ValueError, match="capturable=True needs the step counters on the parameters' device"):
        kernel([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros(())],
               **_fused_kw(**FLAGS[0]))


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(16, 32, device="cuda", generator=gen), torch.randn(16, 1, device="cuda", generator=gen))
            for _ in range(n)]


def _graph_vs_eager(make_opt, make_eager=None, steps: int = 8,
                    warmup: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Trains one model with a captured, replayed step and a copy eagerly; returns both."""
    graphed, eager = _mlp(), _mlp()
    data = _batches(warmup + steps)
    opt_g, opt_e = make_opt(graphed), (make_eager or make_opt)(eager)
    loss_fn = torch.nn.functional.mse_loss
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:warmup]:  # warm-up, including each parameter's first (initialising) call
            static_x.copy_(x), static_y.copy_(y)
            opt_g.zero_grad(set_to_none=True)
            loss_fn(graphed(static_x), static_y).backward()
            opt_g.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_fn(graphed(static_x), static_y).backward()
        opt_g.step()
    for x, y in data[warmup:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
    for x, y in data:
        opt_e.zero_grad(set_to_none=True)
        loss_fn(eager(x), y).backward()
        opt_e.step()
    torch.cuda.synchronize()
    return graphed, eager


KERNEL_FLAGS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}}


@pytest.mark.parametrize("name", ["forloop", "foreach", "fused"])
def test_whole_training_step_in_a_cuda_graph(name: str) -> None:
    flags = _fused_flags() if name == "fused" else KERNEL_FLAGS[name]
    if flags is None:
        pytest.skip("ADOPT has no fused flag in this build")
    lr = lambda: torch.tensor(1e-2, device="cuda")
    make = lambda m: adoptim.ADOPT(m.parameters(), lr=lr(), weight_decay=0.01, capturable=True, **flags)
    graphed, eager = _graph_vs_eager(make)
    # The same kernels on the same data; a replayed graph computes exactly what eager launches do.
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(a, b) for a, b in zip(graphed.parameters(), _mlp().parameters()))


def test_kernel_in_a_cuda_graph_matches_the_eager_forloop_kernel() -> None:
    """The Triton kernel alone (no optimizer class): capture forward, backward and the fused update."""
    kernel = _kernel()

    class Functional:
        def __init__(self, params, fused: bool) -> None:
            self.params, self.fused = list(params), fused
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]
            self.s = [torch.zeros((), device="cuda") for _ in self.params]
            self.lr = torch.tensor(1e-2, device="cuda")

        def zero_grad(self, set_to_none: bool = True) -> None:
            for p in self.params:
                p.grad = None

        @torch.no_grad()
        def step(self) -> None:
            grads = [p.grad for p in self.params]
            kw = dict(beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.01, decoupled_weight_decay=True,
                      clip_exponent=0.25, eps=1e-6, maximize=False, capturable=True, differentiable=False)
            if self.fused:
                kernel(self.params, grads, self.m, self.v, self.s, grad_scale=None, found_inf=None, **kw)
            else:
                loop_adopt(self.params, grads, self.m, self.v, self.s, **kw | dict(capturable=False))

    graphed, eager = _graph_vs_eager(lambda m: Functional(m.parameters(), fused=True),
                                     lambda m: Functional(m.parameters(), fused=False))
    # float32, fused vs for-loop kernel: a few ulps per step (see test_float32_matches_forloop_kernel).
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forloop", "fused"])
def test_grad_scaler_skips_the_step_with_an_inf(name: str) -> None:
    flags = _fused_flags() if name == "fused" else KERNEL_FLAGS[name]
    if flags is None:
        pytest.skip("ADOPT has no fused flag in this build")
    model, plain = _mlp(), _mlp()
    opt = adoptim.ADOPT(model.parameters(), lr=1e-2, **flags)
    ref = adoptim.ADOPT(plain.parameters(), lr=1e-2, foreach=False)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for t, (x, y) in enumerate(_batches(6)):
        opt.zero_grad(), ref.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        if t == 3:
            model[0].weight.grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
            scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if t == 3:
            state, params = before
            for a, b in zip(params, model.parameters()):
                assert torch.equal(a, b)
            for k, st in state["state"].items():
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(st[key], opt.state_dict()["state"][k][key])
            assert scaler.get_scale() == scale / 2
        else:
            ref.step()
    # The skipped step is skipped by the reference optimizer too: then both took the same 5 steps.
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_class_matches_forloop_on_gpu() -> None:
    flags = _fused_flags()
    if flags is None:
        pytest.skip("ADOPT has no fused flag in this build")
    for dtype in (torch.float32, torch.float64):
        a, b = _mlp().to(dtype), _mlp().to(dtype)
        oa = adoptim.ADOPT(a.parameters(), lr=1e-2, weight_decay=0.1, **flags)
        ob = adoptim.ADOPT(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
        for t, (x, y) in enumerate(_batches(6)):
            for m, o in ((a, oa), (b, ob)):
                o.zero_grad()
                if t != 2:
                    torch.nn.functional.mse_loss(m(x.to(dtype)), y.to(dtype)).backward()
                o.step()
        tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, **tol)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(oa.state[p][key].cpu(), ob.state[q][key].cpu(), **tol)


def test_fused_class_follows_moves_of_memory_on_gpu() -> None:
    # Launch plans are cached by address; every event here moves memory without changing a value (new
    # gradients, new storage for a parameter or its state under the same objects, new state from
    # load_state_dict, a step without one parameter), so the fused trajectory must stay the reference's.
    _kernel()
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(70, generator=gen, dtype=torch.float64)]
    params = [p.cuda().requires_grad_(True) for p in init]
    opt = adoptim.ADOPT(params, fused=True, lr=0.05, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ref_hyper = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=False,
                     clip_exponent=0.25, maximize=False)
    from adoptim.reference import ReferenceADOPT

    ref = ReferenceADOPT(init, **ref_hyper)
    kept = [torch.zeros_like(p) for p in params]
    for t in range(8):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in init]
        if t == 4:
            grads[1] = None
        for p, g, k in zip(params, grads, kept):
            p.grad = None if g is None else (k.copy_(g.cuda()) if t in (1, 2) else g.cuda())
        if t == 3:
            params[1].data = params[1].data.clone()
            st = opt.state[params[0]]
            st["exp_avg"].data, st["step"].data = st["exp_avg"].data.clone(), st["step"].data.clone()
        if t == 5:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.step()
        ref.step(grads)
        for p, want in zip(params, ref.params()):
            torch.testing.assert_close(p.detach().cpu(), want, rtol=1e-12, atol=1e-14)


def test_parameters_sharing_memory_take_their_updates_in_order_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # Overlapping views of one buffer, and a parameter listed twice: the programs of one launch would
    # update the shared elements at once; the fused step hands the call to the for-loop kernel, whose
    # result it must equal exactly. Disjoint views of one buffer stay with the Triton kernel.
    _kernel()

    gen = torch.Generator().manual_seed(7)
    n = 1 << 20  # hundreds of programs per tensor
    init = torch.randn(3 * n // 2, generator=gen, dtype=torch.float64)
    grads = [[torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(3)]
    for case in ("overlapping views", "listed twice"):
        runs = []
        for flags in (dict(fused=True), dict(foreach=False)):
            buf = init.cuda()
            if case == "overlapping views":
                params = [torch.nn.Parameter(buf[:n]), torch.nn.Parameter(buf[n // 2:])]
            else:
                params = [torch.nn.Parameter(buf[:n])] * 2
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch.optim warns about a repeated parameter
                opt = adoptim.ADOPT(params, lr=0.1, **flags)
            for row in grads:
                for p, g in zip(params, row):
                    p.grad = g.cuda()
                opt.step()
            runs.append(buf.cpu())
        torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0, msg=case)
    calls = []
    real = functional.single_tensor_adopt
    monkeypatch.setattr(functional, "single_tensor_adopt", lambda *a, **k: (calls.append(1), real(*a, **k)))
    buf = init.cuda()
    disjoint = [torch.nn.Parameter(buf[: n // 2]), torch.nn.Parameter(buf[n // 2:])]
    fused = adoptim.ADOPT(disjoint, lr=0.1, fused=True)
    for row in grads:
        for p, g in zip(disjoint, row):
            p.grad = g[: p.numel()].cuda()
        fused.step()
    assert not calls
