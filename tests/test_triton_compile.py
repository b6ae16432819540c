"""The Triton kernels compiled for Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) on a machine with no GPU.

Triton's interpreter (tests/test_triton.py) runs the kernels' arithmetic on the CPU but skips the GPU
compiler, which is where a kernel that the interpreter accepts can still fail (types, layouts, a scalar
where a block is needed). Triton's NVIDIA backend compiles to PTX and, with the ptxas bundled in the
triton wheel, to a cubin without a GPU: each variant the optimizer launches must get that far, and the
float32 code must use the correctly rounded square root and division the kernel asks for.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest

triton = pytest.importorskip("triton")
if importlib.util.find_spec("triton.backends.nvidia") is None:
    pytest.skip("triton has no NVIDIA backend here", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adoptim.kernels import triton as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
AMPERE = GPUTarget("cuda", 80, 32)
DTYPES = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}
# (lr tensor, weight decay, decoupled, clip exponent, host steps, grad scale, found_inf, maximize)
FLAGS = [
    (False, True, False, 0.25, False, False, False, False),
    (True, True, True, 0.5, True, True, True, True),
    (False, False, False, None, False, True, False, False),
    (True, True, False, 0.3, False, False, True, False),
]


def _signature() -> dict[str, str]:
    sig = {}
    for name in K._adopt_kernel.arg_names:
        if name in ("table_ptr", "chunks_ptr"):
            sig[name] = "*i64"
        elif name == "host_steps_ptr":
            sig[name] = "*fp64"
        elif name in ("lr_ptr", "scale_ptr", "inf_ptr"):
            sig[name] = "*fp32"
        elif name.endswith(("_hi", "_mid", "_lo")):
            sig[name] = "fp32"  # how Triton passes a Python float
        else:
            sig[name] = "constexpr"
    return sig


def _compile(dtype: str, flags: tuple, target: GPUTarget = TARGET) -> object:
    lr_tensor, wd, decoupled, clip, host, scale, inf, maximize = flags
    constants = dict(
        DTYPE=DTYPES[dtype], BF16=dtype == "bf16", STEP_DTYPE=tl.float32, F64=dtype == "fp64", HOST_STEPS=host,
        LR_TENSOR=lr_tensor, HAS_SCALE=scale, HAS_INF=inf, EPS=1e-6, HAS_WD=wd, DECOUPLED=decoupled,
        HAS_CLIP=clip is not None, CLIP=0.0 if clip is None else clip, MAXIMIZE=maximize,
        BLOCK=K._BLOCK, CHUNK=K._CHUNK,
    )
    try:
        return triton.compile(ASTSource(K._adopt_kernel, _signature(), constexprs=constants), target=target,
                              options={"num_warps": K._NUM_WARPS})
    except (FileNotFoundError, RuntimeError) as exc:
        if "ptxas" in str(exc):
            pytest.skip(f"no usable ptxas here: {exc}")
        raise


@pytest.mark.parametrize("dtype, flags", list(itertools.product(DTYPES, FLAGS)))
def test_step_kernel_compiles_for_sm90(dtype: str, flags: tuple) -> None:
    kernel = _compile(dtype, flags)
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"] and ".target sm_90" in ptx
    if dtype != "fp64":  # computed in float32: IEEE square root and division, never the approximations
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
        assert "sqrt.approx" not in ptx and "div.full" not in ptx and "div.approx" not in ptx


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_step_kernel_compiles_for_sm80(dtype: str) -> None:
    kernel = _compile(dtype, FLAGS[1], AMPERE)
    assert kernel.asm["cubin"] and ".target sm_80" in kernel.asm["ptx"]


@pytest.mark.parametrize("step_dtype", [tl.float32, tl.float64])
@pytest.mark.parametrize("has_inf", [False, True])
def test_step_counter_kernel_compiles_for_sm90(step_dtype, has_inf: bool) -> None:
    sig = {"table_ptr": "*i64", "n": "i32", "inf_ptr": "*fp32", "STEP_DTYPE": "constexpr", "HAS_INF": "constexpr",
           "BLOCK": "constexpr"}
    src = ASTSource(K._bump_steps_kernel, sig, constexprs=dict(STEP_DTYPE=step_dtype, HAS_INF=has_inf, BLOCK=256))
    assert triton.compile(src, target=TARGET).asm["cubin"]
