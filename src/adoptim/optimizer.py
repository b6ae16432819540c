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
from . import low_precision, migration
from ._flat import FlatGroups, check_flat_params, common_step
from ._plan import KeptPlans, ParamState, StateDict
from .functional import adopt
from .kernels.common import dtensor_type, state_holds
from .kernels.contract import KernelPlan

_CPU = torch.device("cpu")

__all__ = ["ADOPT", "ADOPTW"]

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


def _saved_seeds(saved_state: dict[Any, Any], saved_groups: list[dict[str, Any]],
                 param_groups: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor]]:
    """The ``param_rounding_seed`` of each parameter's saved state (int64, on the host), checked."""
    out = []
    for gi, (saved, own) in enumerate(zip(saved_groups, param_groups, strict=True)):
        for pi, (key, p) in enumerate(zip(saved["params"], own["params"], strict=True)):
            entry = saved_state.get(key)
            seed = entry.get("param_rounding_seed") if isinstance(entry, dict) else None
            if seed is None:
                continue
            if not torch.is_tensor(seed) or seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
                raise ValueError(f"state of param group {gi} parameter {pi}: param_rounding_seed must be a "
                                 f"one-element integer tensor, got {seed!r}")
            out.append((p, seed.detach().reshape(()).to(device=_CPU, dtype=torch.int64, copy=True)))
    return out


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
        flat: the opt-in flat layout: the parameters, their gradients and their state become views
            into one buffer per (param group, device, dtype), so a step is one kernel call per buffer
            whatever the number of tensors. Every parameter of such a group must require grad and steps
            at every step (a gradient backward did not reach is zero); ``zero_grad`` zeroes the buffer
            in place. See the docs' Kernels page for what else it changes.
        state_precision: how ``exp_avg`` and ``exp_avg_sq`` are stored: ``"full"`` (default) in the
            parameter's dtype; ``"bfloat16"``; ``"8bit"``, blockwise 8-bit codes with one float32 scale per
            block (bitsandbytes' and torchao's 8-bit optimizers' scheme). Both low-precision formats round
            stochastically, reproducibly (see the docs' Low-precision state page). 8-bit state of float32
            CPU parameters steps with a fused C kernel, everything else with a torch for-loop kernel that
            writes the same bits (``fused=False`` forces it); ``fused=True``, ``foreach``, ``capturable``,
            ``differentiable`` and ``flat`` are refused with it. A param group may set its own.
        state_block_size: elements per scale of ``"8bit"`` state, a power of two (default 256).
        state_min_size: parameters with fewer elements keep full-precision state whatever
            ``state_precision`` says (default 4096, as bitsandbytes: biases and norms).
        param_rounding: how bfloat16 parameters (a model in pure bfloat16, no float32 master weights) take
            their update. ``"nearest"`` (default): in the parameter's own arithmetic, as any dtype, so an
            update under half an ulp of the parameter (about 0.4% of it) is lost. ``"stochastic"``: the
            step is computed in float32 and written back rounded stochastically (torchao's
            ``bf16_stochastic_round``), reproducibly: the random numbers are a hash of the parameter's
            ``param_rounding_seed`` (kept in its state), the step and the element's index. ``"kahan"``: a
            bfloat16 ``kahan_comp`` per parameter (2 more bytes per element, in its state) keeps what the
            rounding cut off and adds it back at the next step (Kahan summation, as optimi's
            ``kahan_sum``). One option of three values rather than two flags (which could both be set);
            the values are the methods' usual names. Parameters of other dtypes step as with
            ``"nearest"``. The bfloat16 parameters take the torch for-loop path (moments read and stored
            in their format: use ``state_precision="bfloat16"`` for stochastically rounded moments too);
            ``fused=True``, ``foreach``, ``capturable``, ``differentiable``, ``flat`` and
            ``torch.compile`` are refused with it. See the docs' Low-precision state page, which measures
            the three.

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
        flat: bool = False,
        state_precision: str = "full",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        param_rounding: str = "nearest",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, clip_exponent=clip_exponent,
            maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
            fused=fused, flat=flat, state_precision=state_precision, state_block_size=state_block_size,
            state_min_size=state_min_size, param_rounding=param_rounding,
        )
        V.check_group(defaults)
        super().__init__(params, defaults)
        self.state = StateDict(self.state)  # counts its writes: see _collect
        self._kept = KeptPlans()
        self._kept_split = KeptPlans()  # the low-precision groups' entries (see _collect)
        self.__dict__.setdefault("_flat", FlatGroups())  # add_param_group (above, in torch's __init__) may have made it
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
        V.check_group(merged)
        if merged["fused"]:
            V.check_fused_params(param_group["params"])
        if merged["flat"]:
            params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else param_group["params"]
            check_flat_params(params)
        for key in self.defaults:
            if key in param_group:
                param_group[key] = merged[key]
        super().add_param_group(param_group)
        if merged["flat"]:
            self.__dict__.setdefault("_flat", FlatGroups()).add(self.param_groups[-1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.state = StateDict(self.state)
        self._kept = KeptPlans()
        self._kept_split = KeptPlans()  # the low-precision groups' entries (see _collect)
        self.__dict__.setdefault("_flat", FlatGroups())  # a flat group of an unpickled optimizer is laid out again
        # A state_dict from an older version (or another port) may lack newer flags and tensor steps.
        migration.upgrade_state(self.param_groups, self.state, self.defaults)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, each parameter's state a plain dict (``torch.load(weights_only=True)``)
        with a step tensor of its own (the parameters of a flat group share one while they run)."""
        out = super().state_dict()
        flat = any(g.get("flat") for g in self.param_groups)
        state = {}
        for key, entry in out["state"].items():
            entry = dict(entry) if isinstance(entry, ParamState) else entry
            if flat and torch.is_tensor(entry.get("step")):
                entry = {**entry, "step": entry["step"].clone()}
            state[key] = entry
        out["state"] = state
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; the gradients of a flat group stay views into its buffer, zeroed in
        place, whatever ``set_to_none`` says."""
        flat = [g for g in self.param_groups if g.get("flat")]
        if not flat:
            return super().zero_grad(set_to_none)
        self._flat.zero_grad(flat)
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("flat")]
        try:
            super().zero_grad(set_to_none)
        finally:
            self.param_groups = groups

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
        groups = [migration.translate_group(g, i) for i, g in enumerate(state_dict["param_groups"])]
        # Low-precision entries (codes and scales) are checked and set aside: torch.optim's load would cast
        # them to their parameter's dtype.
        saved_state, low = low_precision.load_entries(state_dict["state"], groups, self.param_groups)
        migration.check_state_matches(saved_state, groups, self.param_groups)
        for gi, (saved, own) in enumerate(zip(groups, self.param_groups, strict=True)):
            for key in self.defaults:
                if key not in saved:
                    saved[key] = own[key]
            saved["flat"] = own["flat"]  # the layout is this run's, as the kernel choice of another port's group
            for key in low_precision.run_keys(own):  # and so is the storage of its state (converted below)
                saved[key] = own[key]
            if own["flat"]:
                common_step((state_dict["state"].get(k) for k in saved["params"]),
                            f"param group {gi} is flat (its parameters step together)")
            try:
                V.check_group(saved)
                if saved["fused"]:
                    V.check_fused_params(own["params"])
            except ValueError as exc:
                raise ValueError(f"param group {gi} of the state_dict: {exc}") from None
        state = migration.cast_complex_state(saved_state, groups, self.param_groups)
        seeds = _saved_seeds(state_dict["state"], groups, self.param_groups)
        # torch.optim's load_state_dict would run the pre-hooks a second time: hand it none.
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        if low or any(g["state_precision"] != "full" for g in self.param_groups):
            low_precision.place_loaded(self, low)
        for p, seed in seeds:  # torch.optim cast them to their parameter's dtype
            if p in self.state:
                self.state[p]["param_rounding_seed"] = seed

    # ------------------------------------------------------------------ step
    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor | None],
        exp_avg_sqs: list[Tensor | None],
        state_steps: list[Tensor | None],
        create: bool = True,
    ) -> list[int]:
        """The one collection pass (torch.optim's name, which dynamo runs eagerly under ``torch.compile``).

        Checks the parameters of ``group`` that have a gradient and appends them, their gradients and
        their state to the lists; raises before anything changes when a step could not be taken. With
        ``create`` it creates the state of parameters that have none and returns ``[]``; without, it
        leaves ``None`` in their state entries and returns their positions, for :meth:`_create_state`
        once every group has passed its checks.

        Under ``torch.compile`` it is called for each group with ``create``; called for the first group,
        it first checks every group (into throwaway lists), so a compiled step that fails changes nothing.
        The traced code never reads ``self.state`` itself: dynamo restarts an analysis (e.g. when a float
        hyperparameter that differs between compiled optimizers has to be specialised) by replaying the
        traced code, which must then take the same path.
        """
        groups = self.param_groups
        if create and torch.compiler.is_compiling() and group is groups[0]:
            for g in groups:
                self._init_group(g, [], [], [], [], [], create=False)
        gi = next(i for i, g in enumerate(groups) if g is group)
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
                dtype = p.dtype
                if (m.shape != shape or m.dtype is not dtype) and not torch.compiler.is_compiling():
                    # Low-precision state of a group switched back to "full": dequantized once, here (the
                    # values are kept, so a check that fails later leaves the same moments).
                    try:
                        st = low_precision.to_full(self, group, p) or st
                    except ValueError as exc:
                        raise RuntimeError(f"param group {gi} parameter {pi}: {exc}") from None
                    m, v, s = st["exp_avg"], st["exp_avg_sq"], st["step"]
                if m.shape != shape or v.shape != shape:
                    raise RuntimeError(
                        f"state of param group {gi} parameter {pi} does not match it: parameter shape "
                        f"{tuple(shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}"
                    )
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
        if create and missing:
            self._create_state(group, params, exp_avgs, exp_avg_sqs, state_steps, missing)
            return []
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
        """Create the state of the parameters at ``missing`` (from :meth:`_init_group`) and fill the lists."""
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
                    st = state[p] = ParamState(state, new) if isinstance(state, StateDict) else new
                else:  # an empty dict someone made by reading opt.state[p] (and may hold): fill it
                    st.update(new)
            state_steps[j], exp_avgs[j], exp_avg_sqs[j] = st["step"], st["exp_avg"], st["exp_avg_sq"]

    def _collect(self) -> list[tuple[dict[str, Any], list[list[Tensor]], KernelPlan | None]]:
        """Every group's lists (params, grads, exp_avgs, exp_avg_sqs, state_steps) and kernel plan.

        A step that follows steps of the same parameters and state reuses the lists kept from the step
        before, with this step's gradients, after a check that notices every way they can go stale
        (``adoptim/_plan.py``). Otherwise each group is collected by :meth:`_init_group`, all groups
        checked before any state is created (so a step that fails changes nothing), and the lists kept.
        A flat group (``flat=True``, ``adoptim/_flat.py``) gives one list entry per buffer.
        """
        groups = self.param_groups
        if torch.compiler.is_compiling():
            if any(g["state_precision"] != "full" for g in groups):
                raise RuntimeError("state_precision other than 'full' has no compiled step yet: step it eagerly")
            if any(g.get("param_rounding", "nearest") != "nearest" for g in groups):
                raise RuntimeError("param_rounding other than 'nearest' has no compiled step: step it eagerly")
            out = []
            for group in groups:
                lists: list[list[Tensor]] = [[], [], [], [], []]
                self._init_group(group, *lists)
                out.append((group, lists, None))
            return out
        for group in groups:  # one look per group (a plain loop: the cheapest), no cost per tensor
            if group["state_precision"] != "full":
                low = [g for g in groups if g["state_precision"] != "full"]
                kept = self._kept_split.lists(low, self.state)
                checked = low_precision.check(self, low) if kept is None else None
                out = self._collect_layouts([g for g in groups if g["state_precision"] == "full"])
                if kept is None:
                    kept = self._kept_split.keep_split(low_precision.build(self, checked), self.state,
                                                       low_precision.STORAGE_KEYS)
                return out + kept
        return self._collect_layouts(groups)

    def _collect_layouts(self, groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[list[Tensor]],
                                                                           KernelPlan | None]]:
        """The lists of full-precision ``groups``, in the default and the flat layout (see :meth:`_collect`)."""
        flat = [g for g in groups if g.get("flat")]
        if not flat:
            return self._collect_default(groups)
        buckets = self._flat.buckets(flat, groups, self.state)
        out = self._collect_default([g for g in groups if not g.get("flat")])
        return out + self._flat.lists(buckets, self.state)

    def _collect_default(self, groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[list[Tensor]],
                                                                          KernelPlan | None]]:
        """The lists of the groups in the default layout (see :meth:`_collect`)."""
        kept = self._kept.lists(groups, self.state)
        if kept is not None:
            return kept
        self._kept.clear()
        gathered = []
        for group in groups:
            lists = [[], [], [], [], []]
            gathered.append((group, lists, self._init_group(group, *lists, create=False)))
        for group, (params, _, exp_avgs, exp_avg_sqs, state_steps), missing in gathered:
            if missing:
                self._create_state(group, params, exp_avgs, exp_avg_sqs, state_steps, missing)
        return self._kept.keep([(group, lists) for group, lists, _ in gathered], self.state)

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        collected = self._collect()
        rounding = self._rounding_state(collected)
        for (group, (params, grads, exp_avgs, exp_avg_sqs, state_steps), plan), extra in zip(
                collected, rounding, strict=True):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adopt(
                params, grads, exp_avgs, exp_avg_sqs, state_steps,
                foreach=group["foreach"], fused=group["fused"], capturable=group["capturable"],
                grad_scale=grad_scale, found_inf=found_inf,
                differentiable=group["differentiable"], beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], decoupled_weight_decay=group["decoupled_weight_decay"],
                clip_exponent=group["clip_exponent"], eps=group["eps"], maximize=group["maximize"], plan=plan,
                state_precision=group["state_precision"], **extra,
            )
        return loss

    def _rounding_state(self, collected: list[tuple[dict[str, Any], list[list[Tensor]], Any]]) -> list[dict[str, Any]]:
        """Per entry of :meth:`_collect`, the keywords of ``param_rounding`` for :func:`adopt`: the groups'
        option and each bfloat16 parameter's ``param_rounding_seed`` or ``kahan_comp`` (made at its first
        step: its position in the optimizer, or zeros). All are checked before any is made or stepped."""
        if all(g.get("param_rounding", "nearest") == "nearest" for g, _, _ in collected):
            return [{} for _ in collected]
        where = {id(p): (gi, pi) for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"])}
        dtensor = dtensor_type()
        todo: list[tuple[dict[str, Any], str, Tensor]] = []
        for group, lists, _ in collected:
            mode = group.get("param_rounding", "nearest")
            if mode == "nearest":
                continue
            key = "kahan_comp" if mode == "kahan" else "param_rounding_seed"
            for p in lists[0]:
                if p.dtype is not torch.bfloat16:
                    continue
                if dtensor is not None and (isinstance(p, dtensor) or id(p) not in where):
                    raise RuntimeError(f"param_rounding={mode!r} takes no sharded (DTensor) parameter; keep "
                                       "'nearest' in the param groups of sharded bfloat16 parameters")
                gi, pi = where[id(p)]
                st, x = self.state[p], self.state[p].get(key)
                bad = x is not None and not (
                    torch.is_tensor(x) and (
                        (x.dtype is torch.bfloat16 and x.shape == p.shape and x.device == p.device) if mode == "kahan"
                        else (x.dtype == torch.int64 and x.numel() == 1)))
                if bad:
                    want = f"bfloat16 of shape {tuple(p.shape)} on {p.device}" if mode == "kahan" else \
                        "a one-element int64 tensor"
                    got = f"{x.dtype} of shape {tuple(x.shape)} on {x.device}" if torch.is_tensor(x) else repr(x)
                    raise RuntimeError(f"state of param group {gi} parameter {pi} does not match it: its {key} "
                                       f"must be {want}, got {got}")
                todo.append((st, key, p))
        for st, key, p in todo:
            if key not in st:
                st[key] = torch.zeros_like(p) if key == "kahan_comp" else \
                    torch.tensor(self._position(p), dtype=torch.int64)
        out = []
        for group, lists, _ in collected:
            mode = group.get("param_rounding", "nearest")
            if mode == "nearest":
                out.append({})
                continue
            key = "kahan_comp" if mode == "kahan" else "param_rounding_seed"
            values = [self.state[p][key] if p.dtype is torch.bfloat16 else None for p in lists[0]]
            out.append({"param_rounding": mode, ("kahan_comps" if mode == "kahan" else "rounding_seeds"): values})
        return out

    def _position(self, p: Tensor) -> int:
        """``p``'s position in the optimizer (its state_dict key): the seed of its stochastic rounding."""
        seen: dict[int, int] = {}
        for g in self.param_groups:
            for q in g["params"]:
                seen.setdefault(id(q), len(seen))
        return seen[id(p)]


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
        flat: bool = False,
        state_precision: str = "full",
        state_block_size: int = 256,
        state_min_size: int = 4096,
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=True,
            clip_exponent=clip_exponent, maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, flat=flat, state_precision=state_precision,
            state_block_size=state_block_size, state_min_size=state_min_size, param_rounding=param_rounding,
        )
