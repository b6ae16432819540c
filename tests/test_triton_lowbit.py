"""The Triton kernel of low-precision state against the torch path, bit for bit.

The kernel runs on CPU tensors through Triton's interpreter: this module loads its own copy of
``adoptim.kernels.triton_lowbit`` with ``TRITON_INTERPRET=1`` set for that import and, through a fixture,
for each interpreter test (as tests/test_triton.py does). The same kernel is compiled for sm_90 and sm_80
without a GPU, and run on CUDA where one is present.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch

import adoptim.kernels
from adoptim import ADOPT, functional
from adoptim.kernels.contract import Hyper
from adoptim.kernels.lowbit import FORMATS, MomentFormat, StateFormat, Stored, lowbit_adopt

triton = pytest.importorskip("triton")

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.0, decoupled_weight_decay=False,
             clip_exponent=0.25, maximize=False)


def _load_interpreted() -> ModuleType:
    path = os.path.join(os.path.dirname(adoptim.kernels.__file__), "triton_lowbit.py")
    spec = importlib.util.spec_from_file_location("_adoptim_triton_lowbit_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
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


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _fmt(kind: str, rounding: str) -> StateFormat:
    sto = rounding == "stochastic"
    return StateFormat(MomentFormat(kind, sto), MomentFormat(kind, sto))


class Run:
    """Parameters and Stored moments of one run, stepped by the torch path or the kernel."""

    def __init__(self, params: list[torch.Tensor], fmt: StateFormat, block: int, steps: list[float]) -> None:
        self.p = [p.clone() for p in params]
        kw = dict(block_size=block, device=torch.device("cpu"))
        self.m = [Stored.empty(p.numel(), fmt.m, signed=True, seed=i, stream=0, **kw) for i, p in enumerate(params)]
        self.v = [Stored.empty(p.numel(), fmt.v, signed=False, seed=i, stream=1, **kw) for i, p in enumerate(params)]
        self.s = [torch.tensor(s) for s in steps]

    def lists(self, grads: list[torch.Tensor]) -> tuple[list, ...]:
        return self.p, grads, self.m, self.v, self.s


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same(a: Run, b: Run) -> None:
    """The same parameter bits (a NaN need only be NaN in both), codes, scales, bfloat16 values and steps."""
    assert [s.item() for s in a.s] == [s.item() for s in b.s]
    for i, (pa, pb) in enumerate(zip(a.p, b.p, strict=True)):
        nan = pa.isnan()
        assert torch.equal(nan, pb.isnan()) and torch.equal(_bits(pa)[~nan], _bits(pb)[~nan]), f"parameter {i}"
        for x, y in ((a.m[i], b.m[i]), (a.v[i], b.v[i])):
            assert torch.equal(_bits(x.data), _bits(y.data)), f"codes or values of parameter {i}"
            if x.absmax is not None:
                assert torch.equal(_bits(x.absmax), _bits(y.absmax)), f"scales of parameter {i}"


def _grads(sizes: list[int], t: int, special: bool = False) -> list[torch.Tensor]:
    out = []
    for i, n in enumerate(sizes):
        gen = torch.Generator().manual_seed(1000 * t + i)
        g = torch.randn(n, generator=gen) * torch.logspace(-5, 1, n)
        g[: min(300, n // 2)] = 0.0  # a zero block (scale 0) and zero second moments
        if special and n > 100:
            g[n // 2 + 3] = float("nan") if t == 2 else 3e38
            g[n - 2] = float("-inf") if t == 1 else 1e-44
        out.append(g)
    return out


def test_the_interpreter_does_not_leak() -> None:
    assert type(K._lowbit_kernel).__name__ == "InterpretedFunction"
    assert os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
@pytest.mark.parametrize(("wd", "decoupled", "clip", "maximize"), [
    (0.0, False, 0.25, False), (1e-2, True, 0.25, True), (1e-2, False, None, False), (1e-2, True, 0.5, False)])
def test_several_tensors_over_several_steps_write_the_torch_paths_bits(kind: str, wd: float, decoupled: bool,
                                                                        clip: float | None, maximize: bool) -> None:
    """From the first step on, several tensors in one launch (some one step ahead), ragged last blocks, one
    element and an empty tensor; every flag that changes the arithmetic."""
    sizes = [5000, 1, 0, 700, 2 * 2048 + 17]
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen) for n in sizes]
    steps = [float(i % 2) for i in range(len(sizes))]
    a, b = (Run(params, FORMATS[kind], 256, steps) for _ in range(2))
    hyper = Hyper(**{**HYPER, "weight_decay": wd, "decoupled_weight_decay": decoupled, "clip_exponent": clip,
                     "maximize": maximize})
    for t in range(4):
        grads = _grads(sizes, t)
        lowbit_adopt(*a.lists(grads), hyper)
        assert K.triton_lowbit_adopt(*b.lists(grads), hyper) == []
        _same(a, b)
    assert [s.item() for s in b.s] == [4.0 + i % 2 for i in range(len(sizes))]
    zero = Stored.empty(sizes[0], FORMATS[kind].m, signed=True, block_size=256, seed=0, stream=0,
                        device=torch.device("cpu"))
    assert not torch.equal(b.p[0], params[0]) and not torch.equal(b.m[0].data, zero.data)  # p and m moved


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize(("kind", "n", "block"), [
    ("8bit", 4097, 4096), ("8bit", 700, 64), ("8bit", 3 * 1024 + 17, 1024), ("bfloat16", 4097, 256),
    ("bfloat16", 255, 256)])
def test_edge_cases_write_the_torch_paths_bits(rounding: str, kind: str, n: int, block: int) -> None:
    """Block sizes up to the largest the kernel takes, nearest rounding, NaN and infinite gradients,
    denormal and huge values, a tensor lr."""
    gen = torch.Generator().manual_seed(n + block)
    params = [torch.randn(n, generator=gen)]
    a, b = (Run(params, _fmt(kind, rounding), block, [0.0]) for _ in range(2))
    hyper = Hyper(**{**HYPER, "lr": torch.tensor(3e-3), "weight_decay": 1e-2, "decoupled_weight_decay": True})
    for t in range(4):
        grads = [g * torch.logspace(-35, 30, n) for g in _grads([n], t, special=True)]
        lowbit_adopt(*a.lists(grads), hyper)
        assert K.triton_lowbit_adopt(*b.lists(grads), hyper) == []
        _same(a, b)
    assert bool(a.p[0].isnan().any())  # the NaN reached the parameters: the edge was exercised


@pytest.mark.usefixtures("interpret")
def test_tensors_it_does_not_take_go_to_the_torch_path_in_the_same_call() -> None:
    """float64, strided, mixed formats, the square-root format, blocks over 4096, a shard and a lazily negated
    gradient are left; the dispatcher's run_lowbit_kernel steps them on the torch path: the whole call is the
    torch path's."""
    n = 600
    gen = torch.Generator().manual_seed(7)
    mixed = StateFormat(MomentFormat("8bit", True), MomentFormat("bfloat16", True))
    sqrt = StateFormat(MomentFormat("8bit", True), MomentFormat("8bit", True, sqrt=True))
    fmts = [(FORMATS["8bit"], 256), (FORMATS["8bit"], 256), (FORMATS["bfloat16"], 256), (FORMATS["8bit"], 256),
            (mixed, 256), (sqrt, 256), (FORMATS["8bit"], 8192), (FORMATS["bfloat16"], 256), (FORMATS["8bit"], 256)]
    runs = []
    for _ in range(2):
        base = torch.randn(2 * n, generator=torch.Generator().manual_seed(8))
        params = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(len(fmts))]
        params[1], params[3] = params[1].double(), base[::2]
        kw = dict(seed=3, device=torch.device("cpu"))
        ms = [Stored.empty(n, f.m, signed=True, stream=0, block_size=b, **kw) for f, b in fmts]
        vs = [Stored.empty(n, f.v, signed=False, stream=1, block_size=b, **kw) for f, b in fmts]
        ms[7].offset = vs[7].offset = 1200  # a shard: its random numbers start there
        runs.append((params, ms, vs, [torch.tensor(0.0) for _ in fmts]))
    hyper = Hyper(**HYPER)
    for t in range(3):
        grads = [torch.randn(n, generator=gen) for _ in fmts]
        grads[1] = grads[1].double()
        grads[8] = torch._neg_view(-grads[8])  # its memory holds minus its values
        lowbit_adopt(runs[0][0], grads, runs[0][1], runs[0][2], runs[0][3], hyper)
        lists = (runs[1][0], grads, runs[1][1], runs[1][2], runs[1][3])
        if t == 0:
            assert K.triton_lowbit_adopt(*lists, hyper) == [1, 3, 4, 5, 6, 7, 8]
            lowbit_adopt(*([x[i] for i in [1, 3, 4, 5, 6, 7, 8]] for x in lists), hyper)
        else:
            functional.run_lowbit_kernel(K.triton_lowbit_adopt, lists, hyper)
        for i in range(len(fmts)):
            a, b = runs[0], runs[1]
            assert torch.equal(a[0][i], b[0][i]) and a[3][i].item() == b[3][i].item() == t + 1
            for x, y in ((a[1][i], b[1][i]), (a[2][i], b[2][i])):
                assert torch.equal(_bits(x.data), _bits(y.data))


@pytest.mark.usefixtures("interpret")
def test_parameters_sharing_memory_are_left_whole() -> None:
    base = torch.randn(1000)
    params = [base[:600], base[400:], torch.randn(50)]
    run = Run([torch.zeros(600), torch.zeros(600), torch.zeros(50)], FORMATS["8bit"], 256, [0.0] * 3)
    assert K.triton_lowbit_adopt(params, [torch.ones_like(p) for p in params], run.m, run.v, run.s,
                                 Hyper(**HYPER)) == [0, 1, 2]
    assert [s.item() for s in run.s] == [0.0] * 3


def test_bad_input_is_named() -> None:
    run = Run([torch.zeros(4)], FORMATS["8bit"], 256, [0.0])
    with pytest.raises(ValueError, match="grad_scale or found_inf"):
        K.triton_lowbit_adopt(run.p, [torch.ones(4)], run.m, run.v, run.s,
                              Hyper(**HYPER, grad_scale=torch.tensor(2.0)))
    assert run.s[0].item() == 0.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, device: str = "cpu") -> None:
    for t in range(4):
        x = torch.randn(16, 80, generator=torch.Generator().manual_seed(100 + t)).to(device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _same_optimizers(runs: list[tuple[torch.nn.Module, ADOPT]]) -> None:
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_the_dispatcher_sends_its_devices_parameters_to_the_kernel(monkeypatch: pytest.MonkeyPatch,
                                                                   kind: str) -> None:
    """The optimizer's step through adopt(): with the dispatcher's device test made to take CPU tensors,
    they reach the interpreted kernel, and the result is fused=False's (the torch path), bit for bit."""
    calls = []
    kernel = K.triton_lowbit_adopt
    monkeypatch.setattr(functional, "_lowbit_triton", lambda: lambda *a: calls.append(1) or kernel(*a))
    runs = []
    for fused in (False, None):
        if fused is None:
            monkeypatch.setattr(functional, "_lowbit_triton_takes", lambda p: True)
        model = _model()
        opt = ADOPT(model.parameters(), state_precision=kind, state_min_size=0, fused=fused, weight_decay=1e-3)
        _train(model, opt)
        runs.append((model, opt))
    assert len(calls) == 4
    _same_optimizers(runs)


def test_cpu_parameters_never_reach_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(functional, "_lowbit_triton", lambda: pytest.fail("the Triton kernel was picked"))
    model = _model()
    _train(model, ADOPT(model.parameters(), state_precision="8bit", state_min_size=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["8bit", "bfloat16"])
def test_on_cuda_the_default_step_is_the_torch_paths(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = functional._lowbit_triton()
    monkeypatch.setattr(functional, "_lowbit_triton", lambda: lambda *a: calls.append(1) or real(*a))
    runs = []
    for fused in (False, None):
        model = _model().cuda()
        opt = ADOPT(model.parameters(), state_precision=kind, state_min_size=0, fused=fused,
                    weight_decay=1e-3, decoupled_weight_decay=True)
        _train(model, opt, "cuda")
        runs.append((model, opt))
    assert len(calls) == 4
    _same_optimizers(runs)


# ----------------------------------------------------------------------------- compiled without a GPU
def _compile(eight: bool, flags: tuple, block: int, arch: int = 90) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adoptim.kernels import triton_lowbit as C

    sig = {}
    for name in C._lowbit_kernel.arg_names:
        if name in ("table_ptr", "chunks_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_cnt_ptr"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "constexpr" if name.isupper() else "fp32"  # how Triton passes a Python float
    sto, coupled, decoupled, clip, maximize = flags
    row = block if eight else C._BF16_ROW
    constants = dict(EIGHT=eight, M_STOCH=sto, V_STOCH=sto, M_LEN=255, V_LEN=256, COUPLED=coupled,
                     DECOUPLED=decoupled, HAS_CLIP=clip, MAXIMIZE=maximize, ROW=row, WIDTH=row,
                     ROWS=max(1, C._ROWS_ELEMENTS // row))
    try:
        return triton.compile(ASTSource(C._lowbit_kernel, sig, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": C._NUM_WARPS, "enable_fp_fusion": False})
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            pytest.skip(f"no usable ptxas here: {exc}")
        raise


FLAGS = [(True, True, False, True, True), (False, False, True, False, False)]  # stochastic, coupled, decoupled, ...


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend")
@pytest.mark.parametrize(("eight", "block"), [(True, 256), (True, 4096), (False, 0)])
@pytest.mark.parametrize("flags", FLAGS)
def test_kernel_compiles_for_sm90_with_ieee_rounding_and_no_fma(monkeypatch: pytest.MonkeyPatch, eight: bool,
                                                                block: int, flags: tuple) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = _compile(eight, flags, block)
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and ".target sm_90" in ptx
    # Correctly rounded square root and division, every product rounded on its own, subnormals kept.
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx and "mul.rn.f32" in ptx
    for bad in ("fma.", "sqrt.approx", "div.full", "div.approx", ".ftz"):
        assert bad not in ptx, bad


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no NVIDIA backend")
@pytest.mark.parametrize("eight", [True, False])
def test_kernel_compiles_for_sm80(monkeypatch: pytest.MonkeyPatch, eight: bool) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = _compile(eight, FLAGS[0], 256, 80)
    assert kernel.asm["cubin"] and ".target sm_80" in kernel.asm["ptx"]
