"""``torch.compile(opt.step, fullgraph=True)``: traces whole, matches eager, never recompiles after warm-up.

A counting backend (it runs the traced graph as is) measures compiles cheaply; one slow test per device
also runs the default inductor backend. The compiled step is made before the lr scheduler wraps
``opt.step`` (the scheduler's wrapper lives in a file that dynamo refuses to trace).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import adoptim

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
# fused=True traces as foreach (the fused kernels are opaque to the compiler, which fuses instead).
KERNELS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def _model(device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(device, dtype)


def _run(device: str, dtype: torch.dtype, flags: dict, backend: object | None, steps: int):
    """Trains a model with the compiled step (or eagerly when backend is None) under a changing lr."""
    from torch._dynamo.utils import counters

    model = _model(device, dtype)
    opt = adoptim.ADOPT(model.parameters(), lr=torch.tensor(0.02, device=device), weight_decay=0.01, **flags)
    step = opt.step if backend is None else torch.compile(opt.step, fullgraph=True, backend=backend)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.8**e)
    gen = torch.Generator().manual_seed(1)
    lrs, counts = [], []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(device, dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        step()
        with warnings.catch_warnings():
            # The scheduler cannot see the compiled step being called (it wraps opt.step afterwards).
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
        counts.append(backend.graphs if isinstance(backend, CountingBackend) else counters["stats"]["unique_graphs"])
    return model, opt, lrs, counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_compiled_step_matches_eager_without_recompiles(device: str, kernel: str) -> None:
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled, c_opt, lrs, counts = _run(device, torch.float64, KERNELS[kernel], backend, steps=7)
    eager, e_opt, e_lrs, _ = _run(device, torch.float64, KERNELS[kernel], None, steps=7)
    assert lrs == e_lrs and len(set(lrs)) == 7  # the scheduler changed the tensor lr at every step
    # One graph for the first call (state initialised on the way) and at most one more once the state
    # exists; none after that, whatever the lr.
    assert counts[1] <= 2 and counts[-1] == counts[1], counts
    # The traced step uses the arithmetic first-step form, eager the branching one: equal up to rounding.
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(c_opt.state[a][key].cpu(), e_opt.state[b][key].cpu(), rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_inductor_compiled_step_matches_eager(device: str) -> None:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, _, _, counts = _run(device, torch.float32, KERNELS["foreach"], "inductor", steps=5)
    eager, _, _, _ = _run(device, torch.float32, KERNELS["foreach"], None, steps=5)
    assert counts[1] <= 2 and counts[-1] == counts[1], counts
    # float32, inductor fuses the update into one loop and may contract multiply-adds: a few ulps.
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_compiling_a_second_optimizer_with_other_hyperparameters(kernel: str) -> None:
    # A second optimizer compiled in the same process, whose weight decay differs from the first's, makes
    # dynamo treat that float as dynamic; under an AOT backend (inductor's too) it is made a tensor, then
    # specialised while tracing, and the analysis restarts. The replay
    # must take the path of the first pass, although that pass created the state: the traced code never
    # reads the state itself (only the eagerly run `_init_group` does), and the result matches eager.
    torch._dynamo.reset()
    for wd in (0.01, 0.02, 0.0):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
        q = p.detach().clone().requires_grad_(True)
        opt = adoptim.ADOPT([p], lr=torch.tensor(0.01), weight_decay=wd, **KERNELS[kernel])
        ref = adoptim.ADOPT([q], lr=torch.tensor(0.01), weight_decay=wd, **KERNELS[kernel])
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
        for _ in range(3):
            g = torch.randn(8, dtype=torch.float64)
            p.grad, q.grad = g.clone(), g.clone()
            step()
            ref.step()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert float(opt.state[p]["step"]) == 3


def test_compiled_step_that_fails_in_a_later_group_creates_no_state() -> None:
    # Under torch.compile every group is checked inside the first `_init_group` call, before any state
    # exists: a bad state in group 1 leaves group 0 without state, and the error names the bad entry.
    torch._dynamo.reset()
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = adoptim.ADOPT([{"params": [a]}, {"params": [b]}], lr=torch.tensor(0.01), foreach=True)
    opt.state[b] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    a.grad, b.grad = torch.randn(4), torch.randn(3)
    before = a.detach().clone()
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="param group 1 parameter 0 does not match it"):
        step()
    assert a not in opt.state and torch.equal(a.detach(), before)
