"""Host time of one optimiser step when the memory traffic is negligible: the per-tensor bookkeeping.

With tiny tensors a step is all host work (Python and C++ around the kernels), which is what separates
a fused step from the memory-bandwidth bound on a fast GPU. Prints one table per tensor count:

- ``ADOPT(fused=True).step()`` and ``torch.optim.AdamW(fused=True).step()`` on the CPU, whole steps;
- the same step with the kept lists' facts checked in Python, as where the compiled library is missing
  (``kernels/facts.py`` checks them in one C call);
- the parts of ADOPT's step: ``_collect`` (the lists kept from the step before, and the check that they
  still hold, in C and in Python; then, for comparison, the collection pass that builds them), and the host code of the
  fused CPU and Triton wrappers with the kernel plan the optimizer keeps (and, for comparison, without
  one). The Triton rows run ``kernels/triton.py``'s host code on CPU tensors with the two kernel launches
  replaced by no-ops (they need ``triton`` importable, not a GPU): the plan's lookup and the launch
  arguments, everything but Triton's own launcher. The last row is what ``ADOPT.step`` does on the host
  for CUDA parameters: ``_collect`` then the Triton wrapper.

    python benchmarks/host_overhead.py                 # 148 and 1000 tensors of 4 elements
    python benchmarks/host_overhead.py --tensors 148 --repeats 5000
    python benchmarks/host_overhead.py --json benchmarks/results/host_overhead.json

One torch thread; medians of ``--repeats`` calls after a warm-up, in microseconds, and per tensor.
``--json PATH`` also writes them (format of ``results_file.py``; ``results``: one
``{"tensors": n, "rows": [{"what": ..., "median_us": ... or null}]}`` per tensor count).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import results_file
import torch

import adoptim
from adoptim import _plan
from adoptim.kernels import fused_cpu
from adoptim.kernels.contract import Hyper, KernelPlan

HYPER = Hyper(beta1=0.9, beta2=0.9999, lr=1e-3, weight_decay=0.0, decoupled_weight_decay=False,
              clip_exponent=0.25, eps=1e-6, maximize=False)


def median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(max(20, repeats // 20)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _params(n: int) -> list[torch.Tensor]:
    params = [torch.zeros(4, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.ones(4)
    return params


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def triton_host_us(opt: adoptim.ADOPT, repeats: int, whole_step: bool) -> float | None:
    """The Triton wrapper's host time with no-op launches: alone, or as the whole ``opt.step()``.

    For the whole step, the dispatcher's call of the fused CPU kernel is pointed at the Triton wrapper,
    so everything ``ADOPT.step`` does for CUDA parameters is timed (torch's step wrapper and hooks,
    ``_collect``, the dispatcher, the wrapper), up to Triton's own launcher.
    """
    try:
        from adoptim.kernels import triton as K
    except ImportError:
        return None
    kernels = K._adopt_kernel, K._bump_steps_kernel
    K._adopt_kernel = K._bump_steps_kernel = _NoLaunch()
    (_, lists, _), = opt._collect()
    plan = KernelPlan()
    cpu_kernel = fused_cpu.fused_cpu_adopt
    if whole_step:
        fused_cpu.fused_cpu_adopt = K.triton_adopt  # looked up on the module at every call
    try:
        return median_us(opt.step if whole_step else lambda: K.triton_adopt(*lists, HYPER, plan), repeats)
    finally:
        K._adopt_kernel, K._bump_steps_kernel = kernels
        fused_cpu.fused_cpu_adopt = cpu_kernel


def run(n: int, repeats: int) -> list[tuple[str, float | None]]:
    params = _params(n)
    adopt = adoptim.ADOPT(params, fused=True)
    adopt.step()
    adamw = torch.optim.AdamW(params, fused=True)
    adamw.step()
    (_, lists, kernel_plan), = adopt._collect()
    # AdamW's lists: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    adamw_init = lambda: adamw._init_group(adamw.param_groups[0], *[[] for _ in range(6)])

    def collection_pass() -> None:
        adopt._kept.clear()  # as after a change the check notices: the lists are built again
        adopt._collect()

    flat_params = _params(n)
    flat = adoptim.ADOPT(flat_params, fused=True, flat=True)
    flat.step()
    # The same step with the kept lists' facts checked in Python (as where the library is missing): the
    # plan made at the first step keeps the choice.
    python_facts = adoptim.ADOPT(_params(n), fused=True)
    real, _plan.kept_facts = _plan.kept_facts, lambda *lists: None
    try:
        python_facts.step()
    finally:
        _plan.kept_facts = real
    row = []
    row.append(("ADOPT(fused=True).step(), C kernel", median_us(adopt.step, repeats)))
    row.append(("ADOPT(fused=True).step(), C kernel, facts checked in Python", median_us(python_facts.step, repeats)))
    row.append(("ADOPT(fused=True, flat=True).step(), C kernel", median_us(flat.step, repeats)))
    row.append(("torch AdamW(fused=True).step()", median_us(adamw.step, repeats)))
    row.append(("torch AdamW._init_group alone", median_us(adamw_init, repeats)))
    row.append(("  ADOPT._collect: kept lists, checked", median_us(adopt._collect, repeats)))
    row.append(("  ADOPT._collect: kept lists, facts checked in Python", median_us(python_facts._collect, repeats)))
    row.append(("  ADOPT._collect: collection pass (lists rebuilt)", median_us(collection_pass, repeats)))
    adopt._collect()
    return row + [
        ("  fused CPU wrapper + C kernel, kept table",
         median_us(lambda: fused_cpu.fused_cpu_adopt(*lists, HYPER, kernel_plan), repeats)),
        ("  fused CPU wrapper + C kernel, table built",
         median_us(lambda: fused_cpu.fused_cpu_adopt(*lists, HYPER), repeats)),
        ("  Triton wrapper, launches stubbed", triton_host_us(adopt, repeats, False)),
        ("ADOPT.step's host path on CUDA, launches stubbed", triton_host_us(adopt, repeats, True)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[148, 1000])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, tensors of 4 elements, median of {args.repeats} calls")
    tables = []
    for n in args.tensors:
        print(f"\n### {n} tensors\n")
        print("| what | median us | us per tensor |")
        print("|---|---:|---:|")
        rows = run(n, args.repeats)
        for name, us in rows:
            cells = "not available | " if us is None else f"{us:.0f} | {us / n:.2f} |"
            print(f"| {name} | {cells}")
        tables.append({"tensors": n, "rows": [{"what": name, "median_us": us} for name, us in rows]})
    if args.json:
        results_file.write(args.json, "host_overhead", vars(args), tables, threads=1)


if __name__ == "__main__":
    main()
