"""Problem builders shared by the optimizer tests, and the loader of the repository's scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

import adoptim
from adoptim.reference import ReferenceADOPT


def load_script(path: Path, name: str) -> ModuleType:
    """The module in ``path``, a script outside any package (``benchmarks/``, ``docs/_ext/``), run now."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` loaded, with ``benchmarks/`` importable while it is in use (the scripts
    import their neighbours)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        yield load_script(folder / f"{name}.py", name)
    finally:
        sys.path.remove(str(folder))


def hard_params(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """The hard cases: zero first gradient, ordinary, late gradients, complex, and a zero-size tensor last."""
    g = torch.Generator().manual_seed(0)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return [
        torch.zeros(5, dtype=dtype),  # first gradient is exactly zero: the first update divides by eps
        torch.randn(3, 4, generator=g, dtype=dtype),
        torch.randn(6, generator=g, dtype=dtype),  # its gradient appears only from call 4 on
        torch.randn(2, 3, generator=g, dtype=cdtype),
        torch.zeros(0, 3, dtype=dtype),
    ]


def hard_grads(params: list[torch.Tensor], steps: int, seed: int = 1) -> list[list[torch.Tensor | None]]:
    """Heavy-tailed gradients (so the clip bound is hit), with the hard cases' gaps and zeros."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        row: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            if p.is_complex():
                real = torch.view_as_real(torch.zeros_like(p))
                x = torch.randn(real.shape, generator=g, dtype=real.dtype) * torch.randn(
                    real.shape, generator=g, dtype=real.dtype
                ).exp()
                row.append(torch.view_as_complex(x))
                continue
            x = torch.randn(p.shape, generator=g, dtype=p.dtype) * torch.randn(
                p.shape, generator=g, dtype=p.dtype
            ).exp()
            if i == 0 and t == 0:
                x = torch.zeros_like(p)
            if i == 2 and t < 4:
                row.append(None)
                continue
            row.append(x)
        out.append(row)
    return out


def run_adopt(
    params: list[torch.Tensor], grads: list[list[torch.Tensor | None]], **kwargs: object
) -> tuple[list[torch.Tensor], adoptim.ADOPT]:
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = adoptim.ADOPT(ps, **kwargs)
    for row in grads:
        for p, gr in zip(ps, row):
            p.grad = None if gr is None else gr.clone()
        opt.step()
    return ps, opt


def run_reference(params: list[torch.Tensor], grads, **hyper: object) -> ReferenceADOPT:
    ref = ReferenceADOPT(params, **hyper)
    for row in grads:
        ref.step(row)
    return ref


FACTS_CHECKERS = ["facts in C", "facts in Python"]


def use_facts_checker(which: str, module: object, monkeypatch: object) -> None:
    """Make ``module`` (``adoptim._plan`` or ``adoptim._flat``) check kept tensors' facts in one C call
    (``kernels/facts.py``; skipped where the library is not built, an error where it is but fails its
    self-test) or, with ``"facts in Python"``, in Python, as where the library is missing."""
    import pytest

    from adoptim.kernels import facts, fused_cpu

    if which == "facts in C":
        if not fused_cpu.is_available():
            pytest.skip("the facts check in C is unavailable (no compiled library)")
        assert facts._library() is not None, "the library is built, but the facts check in C failed its self-test"
    else:
        monkeypatch.setattr(module, "kept_facts", lambda *lists: None)

