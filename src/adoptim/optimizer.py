"""``ADOPT`` and ``ADOPTW``: torch.optim optimizers over the kernels in :mod:`adoptim.kernels`."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validate as V
from .functional import adopt
from .kernels.common import dtensor_type, state_holds
from .migration import translate_group

_CPU = torch.device("cpu")

__all__ = ["ADOPT", "ADOPTW"]

_FUSED_DTYPES = (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _use_grad_for_differentiable(step: Callable) -> Callable:
    """Run ``step`` with autograd on only when the optimizer is differentiable (as torch.optim does)."""

    @functools.wraps(step)
    def wrapper(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        prev = torch.is_grad_enabled()
        try:
            # No graph break here (torch.optim has one), so ``torch.compile(opt.step, fullgraph=True)``
            # works; calling the compiled step under ``torch.no_grad()`` gives an inference graph.
            torch.set_grad_enabled(self.defaults["differentiable"])
            return step(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(prev)

    return wrapper


def _check_state_dtype(gi: int, pi: int, p: Tensor, m: Tensor, v: Tensor) -> None:
    """Raise unless ``exp_avg`` and ``exp_avg_sq`` hold the parameter's values (its dtype or wider)."""
    for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if not state_holds(p, t):
            raise RuntimeError(
                f"state of param group {gi} parameter {pi}: {name} is {t.dtype}, which cannot hold the "
                f"parameter's {p.dtype} (was the parameter cast after some steps?); reload the state with "
                "opt.load_state_dict(opt.state_dict()), which casts it to its parameter's dtype and device"
            )


def _check_fused(group: dict[str, Any], params: Iterable[Any] = ()) -> None:
    """Check the ``fused`` flag of a group (and, for a param group, its parameters) at construction."""
    fused = V.check_flag("fused", group["fused"], allow_none=True)
    if not fused:
        return
    if group["foreach"]:
        raise ValueError("Invalid fused: True together with foreach=True (choose one kernel)")
    if group["differentiable"]:
        raise ValueError("Invalid fused: True together with differentiable=True (needs the for-loop kernel)")
    params = [params] if isinstance(params, Tensor) else params
    for i, p in enumerate(params):
        p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # named parameters
        if not isinstance(p, Tensor):
            continue
        if p.dtype not in _FUSED_DTYPES or p.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"Invalid fused: True for parameter {i} of dtype {p.dtype} on {p.device.type}: the fused "
                "kernels take float16, bfloat16, float32, float64 and complex parameters on cpu or cuda"
            )


class ADOPT(Optimizer):
    r"""ADOPT (Taniguchi et al., NeurIPS 2024): Adam that converges for any :math:`\beta_2`.

    .. math::
        \begin{aligned}
        &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            c \text{ (clip exponent)}, \theta_0, f(\theta) \\
        &g_0 \leftarrow \nabla_\theta f_0(\theta_0);\quad v_0 \leftarrow g_0^2;\quad m_0 \leftarrow 0
            \quad \text{(first call: no parameter update)} \\
        &\textbf{for}\: t = 1, 2, \ldots \\
        &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
            \;(-g_t \text{ if maximize};\; +\lambda\theta_{t-1} \text{ if coupled decay}) \\
        &\quad \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda) \quad \text{(decoupled decay only)} \\
        &\quad n_t \leftarrow \operatorname{clip}_{t^c}\!\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon)\big)
            \quad \text{(the normaliser excludes } g_t) \\
        &\quad m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) n_t
            \quad \text{(normalise, then average)} \\
        &\quad \theta_t \leftarrow \theta_{t-1} - \gamma m_t \\
        &\quad v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2
        \end{aligned}

    ``clip_exponent=None`` is the paper's unclipped Algorithm 1; the default 0.25 is the authors'
    recommended clipped form (bound 1 at the first update). Complex parameters are updated as pairs of
    reals. Each parameter counts its own steps: one whose gradient first appears later starts then.

    Args:
        params: parameters or param groups (dicts), as for any torch.optim optimizer.
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.9999)).
        eps: floor of :math:`\sqrt{v}` in the normaliser (default 1e-6).
        weight_decay: :math:`\lambda` (default 0).
        decoupled_weight_decay: AdamW-style decay of the parameter instead of L2 in the gradient.
        clip_exponent: :math:`c`; ``None`` disables clipping (default 0.25).
        maximize: maximise the objective instead of minimising it.
        foreach: use the multi-tensor kernel; ``None`` picks it when all parameters are on an
            accelerator (as torch.optim does).
        capturable: never synchronise with the host, so the step can be captured in a CUDA graph;
            step counters then live on the parameters' device.
        differentiable: let autograd run through the step (for-loop kernel only).
        fused: use the fused kernel of the parameters' device (a C kernel on the CPU, a Triton kernel on
            CUDA): one pass over memory for all parameters; supports AMP's ``GradScaler``. With neither
            ``foreach`` nor ``fused`` set, the fused kernel is chosen when all parameters are on the CPU
            and the compiled kernel is installed; ``fused=True`` with ``foreach=True`` or
            ``differentiable=True`` is an error.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ADOPT(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        clip_exponent: float | None = 0.25,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused,
        )
        _check_fused(defaults)
        V.check_group(defaults)
        super().__init__(params, defaults)
        if fused:
            # GradScaler then hands this optimizer `grad_scale` and `found_inf` instead of unscaling
            # the gradients itself (torch.optim's protocol for fused optimizers).
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if not isinstance(param_group["params"], (Tensor, set)):
            param_group["params"] = list(param_group["params"])  # a generator is read only once
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_fused(merged, param_group["params"])
        V.check_group(merged)
        for key in self.defaults:
            if key in param_group:
                param_group[key] = merged[key]
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            # A state_dict from an older version (or another port) may lack newer flags.
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state.get("step")):
                    device = p.device if group["capturable"] or group["fused"] else "cpu"
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=V.scalar_dtype(), device=device
                    )

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of adoptim, torch-adopt or timm's ``Adopt``; nothing changes if it is invalid.

        As in torch.optim, the load pre-hooks run first (one may adapt a foreign dict); what they leave is
        translated (other ports' key names), checked against the parameters, and its groups validated
        as ``add_param_group`` validates them, all before anything changes. A key a saved group lacks
        takes the value of the loading optimizer's group, and so does the kernel choice of another port's
        group.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"state_dict must be a dict (from Optimizer.state_dict()), got {type(state_dict).__name__}"
            )
        state_dict = state_dict.copy()  # shallow, as torch.optim does: hooks may change its keys
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                "state_dict must be a dict with 'state' and 'param_groups' (from Optimizer.state_dict())"
            )
        groups = [translate_group(g, i) for i, g in enumerate(state_dict["param_groups"])]
        self._check_state_matches(state_dict["state"], groups)
        for gi, (saved, own) in enumerate(zip(groups, self.param_groups, strict=True)):
            for key in self.defaults:
                if key not in saved:
                    saved[key] = own[key]
            try:
                _check_fused(saved, own["params"])
                V.check_group(saved)
            except ValueError as exc:
                raise ValueError(f"param group {gi} of the state_dict: {exc}") from None
        state = self._cast_complex_state(state_dict["state"], groups)
        # torch.optim's load_state_dict would run the pre-hooks a second time: hand it none.
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks

    def _cast_complex_state(self, saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]]) -> dict[Any, Any]:
        """The saved state with the moments of complex parameters in their parameter's dtype.

        torch.optim casts loaded state to its parameter's dtype for floating-point parameters only; a
        complex parameter cast after some steps (complex64 to complex128) would otherwise keep state its
        step refuses, with no way to reload it.
        """
        out = dict(saved_state)
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            for key, p in zip(saved["params"], group["params"], strict=True):
                st = out.get(key)
                if st and p.is_complex():
                    out[key] = {k: v.to(p.dtype) if k != "step" and torch.is_tensor(v) and v.is_complex() else v
                                for k, v in st.items()}
        return out

    def _check_state_matches(self, saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]]) -> None:
        dtensor = dtensor_type()
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups but the optimizer has "
                f"{len(self.param_groups)}"
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} of the state_dict has {len(saved['params'])} parameters but the "
                    f"optimizer's has {len(group['params'])}"
                )
            for pi, (key, p) in enumerate(zip(saved["params"], group["params"], strict=True)):
                st = saved_state.get(key)
                if st is None or (isinstance(st, dict) and not st):
                    continue
                if not isinstance(st, dict):
                    raise ValueError(
                        f"state of param group {gi} parameter {pi} is a {type(st).__name__}, not a dict of "
                        "'step', 'exp_avg' and 'exp_avg_sq'"
                    )
                missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
                if missing:
                    hint = ""
                    if missing == ["step"] and "step" in saved:
                        # pytorch_optimizer's ADOPT counts steps per param group, not per parameter.
                        hint = (" (its param group holds the step count, as pytorch_optimizer's ADOPT saves it: "
                                "convert it with adoptim.integrations.pytorch_optimizer.convert_state_dict)")
                    raise ValueError(f"state of param group {gi} parameter {pi} lacks {missing}{hint}")
                for name in ("exp_avg", "exp_avg_sq"):
                    t = st[name]
                    if not torch.is_tensor(t) or t.shape != p.shape:
                        shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                        raise ValueError(
                            f"state_dict does not match the parameters: param group {gi} parameter {pi} has "
                            f"shape {tuple(p.shape)} but its {name} has shape {shape}"
                        )
                    if dtensor is not None and isinstance(p, dtensor) != isinstance(t, dtensor):
                        raise ValueError(
                            f"state_dict does not match the parameters: param group {gi} parameter {pi} is a "
                            f"{type(p).__name__} but its {name} is a {type(t).__name__}. A sharded (FSDP2, "
                            "DTensor) optimizer loads a full or sharded state dict through torch.distributed."
                            "checkpoint.state_dict.set_optimizer_state_dict, which lays the state out as the "
                            "parameters are"
                        )
                step = st["step"]
                if torch.is_tensor(step):
                    if step.numel() != 1 or step.dtype == torch.bool or step.is_complex():
                        raise ValueError(
                            f"state of param group {gi} parameter {pi} has a step of {step.numel()} elements "
                            f"of {step.dtype} (must be one real number)"
                        )
                elif not V.is_real(step):
                    raise ValueError(
                        f"state of param group {gi} parameter {pi} has step {step!r} (must be a number or a "
                        "one-element tensor)"
                    )

    # ------------------------------------------------------------------ step
    def _gather(
        self,
        gi: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor | None],
        exp_avg_sqs: list[Tensor | None],
        state_steps: list[Tensor | None],
    ) -> list[int]:
        """Check the parameters of group ``gi`` that have a gradient and append them and their state.

        Raises before anything changes when a step could not be taken. Returns the positions in the lists
        of parameters that have no state yet; their state entries are ``None`` until
        :meth:`_create_state` fills them. One pass, a few attribute reads per parameter (about what
        torch's ``AdamW._init_group`` costs): for many small tensors, a large part of a fused step.
        """
        state = self.state
        differentiable = group["differentiable"]
        missing: list[int] = []
        for pi, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"ADOPT does not support sparse gradients (param group {gi} parameter {pi}); "
                    "use dense gradients, e.g. nn.Embedding(sparse=False)"
                )
            st = state.get(p)
            if st:
                m, v, s = st["exp_avg"], st["exp_avg_sq"], st["step"]
                shape = p.shape
                if m.shape != shape or v.shape != shape:
                    raise RuntimeError(
                        f"state of param group {gi} parameter {pi} does not match it: parameter shape "
                        f"{tuple(shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}"
                    )
                dtype = p.dtype
                if m.dtype is not dtype or v.dtype is not dtype:  # rare: wider state passes, narrower raises
                    _check_state_dtype(gi, pi, p, m, v)
                if differentiable and s.requires_grad:
                    raise RuntimeError(
                        f"`requires_grad` is not supported for `step` in differentiable mode (param group {gi} "
                        f"parameter {pi})"
                    )
            else:
                missing.append(len(params))
                m = v = s = None
            params.append(p)
            grads.append(g)
            exp_avgs.append(m)
            exp_avg_sqs.append(v)
            state_steps.append(s)
        return missing

    def _create_state(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        exp_avgs: list[Tensor | None],
        exp_avg_sqs: list[Tensor | None],
        state_steps: list[Tensor | None],
        missing: list[int],
    ) -> None:
        """Create the state of the parameters at ``missing`` (from :meth:`_gather`) and fill the lists."""
        # Steps live on the host unless capturable or fused (reading them there costs no device sync);
        # the fused CUDA kernel keeps them on the device so it never waits for the host.
        on_device = group["capturable"] or group["fused"]
        state = self.state
        zero_steps: dict[torch.device, Tensor] = {}  # one zero step per device, cloned for each parameter
        for j in missing:
            p = params[j]
            st = state.get(p)
            if not st:  # else p is listed twice in the group and its first entry made the state
                device = p.device if on_device else _CPU
                zero = zero_steps.get(device)
                if zero is None:
                    zero = zero_steps[device] = torch.zeros((), dtype=V.scalar_dtype(), device=device)
                # zeros_like keeps the parameter's memory format by default (preserve_format); spelling
                # that out costs a keyword parse per call, a quarter of the call for small tensors.
                new = {"step": zero.clone(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                if st is None:
                    st = state[p] = new
                else:  # an empty dict someone made by reading opt.state[p] (and may hold): fill it
                    st.update(new)
            state_steps[j], exp_avgs[j], exp_avg_sqs[j] = st["step"], st["exp_avg"], st["exp_avg_sq"]

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        """Collect one group's tensors, creating missing state (torch.optim's name: dynamo runs it eagerly).

        Used only under ``torch.compile``. Called for the first group, it first checks every group (into
        throwaway lists), so a step that fails changes nothing. The traced code never reads ``self.state``
        itself: this call creates state, and dynamo restarts an analysis (e.g. when a float hyperparameter
        that differs between compiled optimizers has to be specialised) by replaying the traced code,
        which must then take the same path.
        """
        groups = self.param_groups
        if group is groups[0]:
            for gi, g in enumerate(groups):
                self._gather(gi, g, [], [], [], [], [])
        gi = next(i for i, g in enumerate(groups) if g is group)
        missing = self._gather(gi, group, params, grads, exp_avgs, exp_avg_sqs, state_steps)
        self._create_state(group, params, exp_avgs, exp_avg_sqs, state_steps, missing)

    def _collect(self) -> list[tuple[dict[str, Any], list[list[Tensor]]]]:
        """Every group's lists (params, grads, exp_avgs, exp_avg_sqs, state_steps), state created.

        All groups are checked before any state is created, so a step that fails changes nothing.
        """
        groups = self.param_groups
        if torch.compiler.is_compiling():
            # dynamo runs `_init_group` eagerly instead of tracing it (state creation stays out of the
            # graph); the checks of all groups run inside its first call.
            out = []
            for group in groups:
                lists: list[list[Tensor]] = [[], [], [], [], []]
                self._init_group(group, *lists)
                out.append((group, lists))
            return out
        gathered = []
        for gi, group in enumerate(groups):
            lists = [[], [], [], [], []]
            gathered.append((group, lists, self._gather(gi, group, *lists)))
        for group, (params, _, exp_avgs, exp_avg_sqs, state_steps), missing in gathered:
            if missing:
                self._create_state(group, params, exp_avgs, exp_avg_sqs, state_steps, missing)
        return [(group, lists) for group, lists, _ in gathered]

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group, (params, grads, exp_avgs, exp_avg_sqs, state_steps) in self._collect():
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adopt(
                params, grads, exp_avgs, exp_avg_sqs, state_steps,
                foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
                grad_scale=grad_scale, found_inf=found_inf,
                differentiable=group["differentiable"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                clip_exponent=group["clip_exponent"], eps=group["eps"], maximize=group["maximize"],
            )
        return loss


class ADOPTW(ADOPT):
    """ADOPT with decoupled weight decay (as AdamW is to Adam); ``weight_decay`` defaults to 1e-2."""

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 1e-2,
        *,
        clip_exponent: float | None = 0.25,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True,
            clip_exponent=clip_exponent, maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
        )
