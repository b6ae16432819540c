"""``adopt(...)``: the functional form of ADOPT and the one dispatcher of the kernels.

A caller (the :class:`~adoptim.ADOPT` class, a training loop that keeps its own state, a compiled
step) switches kernels with one flag. This module alone checks the kernel choice, builds the step's
:class:`~adoptim.kernels.contract.Hyper` record once, picks the kernel, unscales AMP gradients for
the kernels that do not take AMP's arguments, runs the for-loop kernel on what a fused kernel left,
and falls back to the foreach kernel when the fused CPU library is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from itertools import repeat
from operator import attrgetter

import torch
from torch import Tensor

from .kernels import fused_cpu, lowbit_cpu
from .kernels.common import PLAIN_TENSOR_TYPES, dtensor_type
from .kernels.contract import FUSED_DEVICES, Hyper, Kernel, KernelPlan, check_kernel_choice
from .kernels.foreach import foreach_adopt
from .kernels.lowbit import MomentFormat, ParamWrite, Stored, lowbit_adopt
from .kernels.single_tensor import single_tensor_adopt

__all__ = ["adopt", "default_foreach", "default_fused", "run_fused_kernel"]

_FOREACH_DEVICES = ("cuda", "xpu", "mps")
_IS_CPU = attrgetter("is_cpu")
_IS_CUDA = attrgetter("is_cuda")


def default_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """The kernel chosen when the user sets none: foreach on accelerators, the for-loop elsewhere.

    Like torch.optim, the multi-tensor kernel is the default only where a kernel launch is expensive
    (all parameters on CUDA-like devices) and never with ``differentiable=True``.
    """
    if differentiable or not params:
        return False
    return all(type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params) and all(
        p.device.type in _FOREACH_DEVICES for p in params
    )


def default_fused(params: list[Tensor], differentiable: bool) -> bool:
    """Whether the fused kernel is chosen when the user sets neither ``foreach`` nor ``fused``.

    Unlike torch.optim, which defaults to foreach on CUDA and never to fused, adoptim defaults to its
    fused kernel on the CPU: it is the fastest there (several times the for-loop and foreach kernels, see
    the docs' Performance page), starts in milliseconds, and matches the for-loop kernel to rounding. It is
    not chosen with ``differentiable=True``, under ``torch.compile`` (the C call cannot be traced), for
    tensor subclasses, or when the compiled kernel is not installed.
    """
    if differentiable or not params or _is_compiling():
        return False
    if not _all_plain(params):
        return False
    return all(map(_IS_CPU, params)) and fused_cpu.is_available()


def _all_plain(params: list[Tensor]) -> bool:
    """Whether all are plain tensors or parameters (no tensor subclass such as DTensor)."""
    if set(map(type, params)) <= PLAIN_TENSOR_TYPES:  # one pass in C for the usual case
        return True
    return all(type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params)


def _grads_placed_like_params(dtensor: type, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """The gradients, each DTensor one laid out as its parameter (the ``.grad`` attributes are left as they are).

    A gradient of another placement than its parameter's (tensor parallelism: a ``Partial`` gradient of a
    ``Replicate`` parameter, a ``Shard(1)`` gradient of a ``Shard(0)`` one) is redistributed once, here.
    Left to the kernels, DTensor would redistribute it in every operation that reads it, and refuses to in
    an in-place operation on a tensor computed from it (``normed.clamp_``), after the step had begun.
    """
    if not any(issubclass(t, dtensor) for t in set(map(type, grads))):
        return grads
    out = list(grads)
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if (isinstance(g, dtensor) and isinstance(p, dtensor) and g.placements != p.placements
                and g.device_mesh == p.device_mesh):
            out[i] = g.redistribute(p.device_mesh, p.placements)
    return out


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def adopt(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    decoupled_weight_decay: bool,
    clip_exponent: float | None,
    eps: float,
    maximize: bool,
    plan: KernelPlan | None = None,
    state_precision: str = "full",
    param_rounding: str = "nearest",
    rounding_seeds: Sequence[int | Tensor | None] | None = None,
    kahan_comps: Sequence[Tensor | None] | None = None,
) -> None:
    r"""Run one ADOPT step in place on ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps``.

    ``state_steps`` are float tensors counting the calls made so far for each parameter (0 before the
    first), one tensor per parameter: a tensor shared by several parameters would be advanced once per
    parameter by the for-loop kernel and read before any advance by the others. See
    :mod:`adoptim.reference` for the exact arithmetic.

    Kernel choice: ``fused=True`` runs the fused kernel of the parameters' device (the C kernel on the
    CPU, the Triton kernel on CUDA); ``foreach=True`` the multi-tensor kernel; ``foreach=False`` the
    for-loop kernel. With neither set, the fused kernel is used when all parameters are on the CPU
    (:func:`default_fused`), else foreach on accelerators and the for-loop kernel elsewhere
    (:func:`default_foreach`). ``grad_scale`` and ``found_inf`` are AMP's: the gradients are divided
    by ``grad_scale`` and a nonzero ``found_inf`` skips the call entirely (steps included).

    ``plan``: a :class:`~adoptim.kernels.contract.KernelPlan` kept by the caller between calls with the
    same parameters and state (only the gradients new); the fused kernels keep their address tables in
    it, which saves most of their host work per tensor. Pass a new one whenever a parameter or state
    tensor changes.

    ``state_precision``: ``"full"`` (the moments are tensors of their parameters' dtypes and shapes), or
    ``"8bit"``/``"bfloat16"``: the moments are :class:`~adoptim.kernels.lowbit.Stored` records and the
    low-precision kernels run (:class:`~adoptim.ADOPT`'s ``state_precision`` makes them): the fused 8-bit
    and bfloat16 kernels where they take the tensors (float32 parameters: the C kernel on the CPU, the
    Triton kernel on CUDA) unless ``fused=False``; they write the same bits as the torch path that runs
    everywhere else.

    ``param_rounding``: how bfloat16 parameters take their update (:class:`~adoptim.ADOPT`'s option of that
    name). ``"nearest"`` (default): as any parameter, in the kernel chosen above. ``"stochastic"`` and
    ``"kahan"``: their step is computed in float32 by the torch for-loop path
    (:func:`~adoptim.kernels.lowbit.lowbit_adopt`, full-precision moments read and stored in their own dtype)
    and written back stochastically rounded, keyed by ``rounding_seeds[i]`` (an integer or a one-element
    integer tensor), or Kahan-compensated with ``kahan_comps[i]`` (a bfloat16 tensor of the parameter's
    shape, zeros at first, updated in place). Entries of parameters of other dtypes are ignored (may be
    ``None``); those parameters step as with ``"nearest"``.

    Example::

        >>> p, g = torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])
        >>> m, v, s = torch.zeros(3), torch.zeros(3), torch.tensor(0.0)
        >>> for _ in range(2):
        ...     adopt([p], [g], [m], [v], [s], beta1=0.9, beta2=0.9999, lr=0.1, weight_decay=0.0,
        ...           decoupled_weight_decay=False, clip_exponent=0.25, eps=1e-6, maximize=False)
        >>> p  # the first call only set v = g*g; the second moved p by -lr*(1-beta1)*sign(g)
        tensor([-0.0100,  0.0100, -0.0100])
    """
    lists = (grads, exp_avgs, exp_avg_sqs, state_steps)
    if any(len(x) != len(params) for x in lists):
        raise ValueError(
            "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got "
            f"{[len(params)] + [len(x) for x in lists]}"
        )
    if not all(map(isinstance, state_steps, repeat(Tensor))):
        raise TypeError("state_steps must be a list of tensors")
    check_kernel_choice(foreach, fused, differentiable)
    dtensor = dtensor_type()
    if dtensor is not None:
        grads = _grads_placed_like_params(dtensor, params, grads)
    if isinstance(lr, Tensor) and lr.dim():
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = lr.reshape(())  # every kernel takes a 0-dim lr (the optimizer's groups hold one already)
    compiling = _is_compiling()
    hyper = Hyper(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent, maximize=maximize,
        # A traced step must not branch on a tensor's value: the arithmetic first-step form.
        capturable=capturable or compiling, differentiable=differentiable,
        grad_scale=grad_scale, found_inf=found_inf,
    )
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    if param_rounding != "nearest":
        lists = _run_rounded(lists, hyper, param_rounding, rounding_seeds, kahan_comps, foreach, fused)
        if not lists[0]:
            return
        plan = None  # the plan was made for all of the lists
    if state_precision != "full":  # its records say how each moment is stored
        _run_eager(lowbit_adopt if fused is False else _lowbit_fused, lists, hyper)
        return
    # The kernel choice depends on the flags and on the parameters' devices and types, which a plan's
    # promise covers: it is kept there.
    flags = (fused, foreach, differentiable)
    route = plan.route if plan is not None and not compiling else None
    if route is None or route[0] != flags:
        route = flags, _route(params, fused, foreach, differentiable, compiling)
        if plan is not None and not compiling:
            plan.route = route
    by_device = route[1]
    if not isinstance(by_device, dict):  # an eager kernel: True for foreach, False for the for-loop
        _run_eager(foreach_adopt if by_device else single_tensor_adopt, lists, hyper)
        return
    for device_type, idx in by_device.items():
        part = lists if idx is None else tuple([x[i] for i in idx] for x in lists)
        if compiling:
            # Neither the C call nor the Triton launch (its host code reads tensor addresses) can be
            # traced; the compiled foreach step is fused by the compiler instead.
            _run_eager(foreach_adopt, part, hyper)
        elif device_type == "cpu":
            if fused_cpu.library() is None:  # not built: one warning, then the foreach kernel
                _run_eager(foreach_adopt, part, hyper)
            else:
                run_fused_kernel(fused_cpu.fused_cpu_adopt, part, hyper, plan if idx is None else None)
        else:  # cuda
            from .kernels.triton import triton_adopt  # imported lazily: Triton ships with CUDA torch

            run_fused_kernel(triton_adopt, part, hyper, plan if idx is None else None)


def _route(params: list[Tensor], fused: bool | None, foreach: bool | None, differentiable: bool,
           compiling: bool) -> bool | dict[str, list[int] | None]:
    """Whether the eager kernel to run is foreach (else the for-loop kernel), or the fused kernels'
    parameters by device type (``None``: all of them)."""
    # default_fused says yes only for all-CPU parameters outside torch.compile: then nothing below needs
    # to look at the devices again, and foreach is not used.
    all_cpu = fused is None and foreach is None and default_fused(params, differentiable)
    if not (fused or all_cpu):
        return default_foreach(params, differentiable) if foreach is None else bool(foreach)
    if all_cpu or (not compiling and all(map(_IS_CPU, params))):
        return {"cpu": None}  # the common cases take the lists as they are, with no per-tensor loop
    if not compiling and all(map(_IS_CUDA, params)):
        return {"cuda": None}
    by_device: dict[str, list[int] | None] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device.type, []).append(i)
    other = sorted(set(by_device) - set(FUSED_DEVICES))
    if other:  # before any device's parameters step
        raise ValueError(
            f"fused=True supports parameters on cpu and cuda, got one on {other[0]}; use foreach=True there"
        )
    return by_device


def _run_rounded(lists: tuple[list, ...], hyper: Hyper, mode: str, seeds: Sequence | None, comps: Sequence | None,
                 foreach: bool | None, fused: bool | None) -> tuple[list, ...]:
    """Step the bfloat16 parameters of ``lists`` with ``param_rounding`` ``mode`` (see :func:`adopt`) and return
    the lists of the others. Everything is checked before anything changes."""
    params = lists[0]
    if mode not in ("stochastic", "kahan"):
        raise ValueError(f"Invalid param_rounding: {mode!r} (must be one of 'nearest', 'stochastic', 'kahan')")
    name, given = ("rounding_seeds", seeds) if mode == "stochastic" else ("kahan_comps", comps)
    if given is None or len(given) != len(params):
        raise ValueError(f"param_rounding={mode!r} needs {name}, one entry per parameter, got "
                         f"{'none' if given is None else len(given)} for {len(params)} parameters")
    for flag, value in (("foreach", foreach), ("fused", fused), ("capturable", hyper.capturable),
                        ("differentiable", hyper.differentiable)):
        if value:
            raise ValueError(f"Invalid param_rounding: {mode!r} together with {flag}=True (bfloat16 parameters "
                             "are then stepped by the torch for-loop path, which does not take that option)")
    mine = [i for i, p in enumerate(params) if p.dtype is torch.bfloat16]
    if not mine:
        return lists
    writes = []
    for i in mine:
        p, x = params[i], given[i]
        if mode == "kahan":
            if not (torch.is_tensor(x) and x.dtype is torch.bfloat16 and x.shape == p.shape and x.device == p.device):
                got = f"{x.dtype} of shape {tuple(x.shape)} on {x.device}" if torch.is_tensor(x) else repr(x)
                raise ValueError(f"kahan_comps[{i}] must be a bfloat16 tensor of its parameter's shape "
                                 f"{tuple(p.shape)} on {p.device}, got {got}")
            writes.append(ParamWrite(mode, comp=x))
        else:
            if torch.is_tensor(x) and x.numel() == 1 and not x.is_floating_point() and not x.is_complex():
                x = int(x)
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"rounding_seeds[{i}] must be an integer or a one-element integer tensor, got {x!r}")
            writes.append(ParamWrite(mode, seed=x))
    picked = [[x[i] for i in mine] for x in lists]
    back = []  # full-precision moments stepped through flat copies (not views): copied back after the step
    for k in (2, 3):
        for j, m in enumerate(picked[k]):
            if isinstance(m, Stored):
                continue
            data = m.view(-1) if m.is_contiguous() else m.reshape(-1)
            if not m.is_contiguous():
                back.append((m, data))
            kind = "bfloat16" if m.dtype is torch.bfloat16 else "float32"
            picked[k][j] = Stored(data, None, MomentFormat(kind), signed=k == 2, block_size=1, seed=0, stream=k - 2)
    _run_eager(partial(lowbit_adopt, param_writes=writes), picked, hyper)
    for m, data in back:
        m.copy_(data.view(m.shape))
    rest = [i for i in range(len(params)) if params[i].dtype is not torch.bfloat16]
    return tuple([x[i] for i in rest] for x in lists)


def _lowbit_fused(params: list[Tensor], grads: list[Tensor], exp_avgs: list, exp_avg_sqs: list,
                  state_steps: list[Tensor], hyper: Hyper, plan: KernelPlan | None = None) -> tuple[()]:
    """The fused low-precision kernels on the tensors they take (the Triton kernel on CUDA where Triton is
    installed, the C kernel on the CPU), the torch path on the rest: all of them write the same bits."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    gpu = [i for i, p in enumerate(params) if _lowbit_triton_takes(p)]
    kernel = _lowbit_triton() if gpu else None
    if kernel is not None:
        if len(gpu) == len(params):
            run_lowbit_kernel(kernel, lists, hyper)
            return ()
        run_lowbit_kernel(kernel, tuple([x[i] for i in gpu] for x in lists), hyper)
        rest = sorted(set(range(len(params))) - set(gpu))
        lists = tuple([x[i] for i in rest] for x in lists)
    if lowbit_cpu.available():
        run_lowbit_kernel(lowbit_cpu.lowbit_cpu_adopt, lists, hyper)
    else:
        lowbit_adopt(*lists, hyper)
    return ()


def _lowbit_triton_takes(p: Tensor) -> bool:
    """Whether a low-precision parameter goes to the Triton kernel (which takes or leaves it)."""
    return p.is_cuda


def _lowbit_triton() -> Kernel | None:
    """The Triton low-precision kernel, or None where Triton is not installed (the torch path runs)."""
    try:
        from .kernels.triton_lowbit import triton_lowbit_adopt
    except ImportError:
        return None
    return triton_lowbit_adopt


def run_lowbit_kernel(kernel: Kernel, lists: Sequence[list], hyper: Hyper) -> None:
    """Run a fused low-precision kernel, then the torch path on the tensors it left."""
    rest = kernel(*lists, hyper)
    if rest:
        lowbit_adopt(*([x[i] for i in rest] for x in lists), hyper)


def run_fused_kernel(kernel: Kernel, lists: Sequence[list[Tensor]], hyper: Hyper,
                     plan: KernelPlan | None = None) -> None:
    """Run a fused kernel, then the for-loop kernel on the tensors it left (the one place of that fallback)."""
    rest = kernel(*lists, hyper, plan)
    if rest:
        # found_inf is read on the host here (a synchronisation) only when some tensor was left.
        _run_eager(single_tensor_adopt, tuple([x[i] for i in rest] for x in lists), hyper)


def _run_eager(kernel: Kernel, lists: Sequence[list[Tensor]], hyper: Hyper) -> None:
    """Run a kernel that takes no AMP arguments: a nonzero ``found_inf`` (read on the host) skips the call;
    the gradients are divided by ``grad_scale`` first, into new tensors (the ``.grad`` tensors keep their
    values)."""
    grad_scale, found_inf = hyper.grad_scale, hyper.found_inf
    if grad_scale is None and found_inf is None:
        kernel(*lists, hyper)
        return
    if found_inf is not None and float(found_inf) != 0.0:
        return
    params, grads, exp_avgs, exp_avg_sqs, state_steps = lists
    if grad_scale is not None:
        grads = [g / grad_scale.to(g.device) for g in grads]
    kernel(params, grads, exp_avgs, exp_avg_sqs, state_steps, replace(hyper, grad_scale=None, found_inf=None))
