"""adoptim's ADOPT in timm's optimizer factory.

After :func:`register`, ``timm.optim.create_optimizer_v2(model, "adoptim", ...)`` builds
:class:`adoptim.ADOPT` and ``"adoptimw"`` builds it with decoupled weight decay (as ``ADOPTW``).
timm's factory does what it does for every optimizer: biases, norm weights (every parameter with at most
one dimension) and the names in ``model.no_weight_decay()`` go to a group without weight decay, and the
other keyword arguments (``betas``, ``eps``, ``clip_exponent``, ``foreach``, ``fused``,
``state_precision``, ``state_block_size``, ``state_min_size``...) reach ADOPT unchanged, also from timm's
``train.py --opt-kwargs state_precision=8bit``. ``"adoptim8bit"`` and ``"adoptimbf16"`` (and
``"adoptimw8bit"``, ``"adoptimwbf16"``) are the same with ``state_precision`` ``"8bit"`` or ``"bfloat16"``
by default, named as timm names bitsandbytes' 8-bit optimizers (``list_optimizers("*8bit")`` finds them).
These names are separate from timm's own ``"adopt"``/``"adoptw"``, which build timm's ``Adopt`` (clip
exponent 1/3 by default instead of 0.25).

Example::

    >>> import timm, timm.optim
    >>> from adoptim.integrations.timm import register
    >>> register()
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> opt = timm.optim.create_optimizer_v2(model, "adoptimw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.99))
    >>> opt = timm.optim.create_optimizer_v2(model, "adoptimw8bit", lr=1e-3, weight_decay=0.05)
"""

from __future__ import annotations

from typing import Any

from ..optimizer import ADOPT

__all__ = ["NAMES", "register"]

# timm splits an optimizer name at "_" (for "lookahead_<name>"), so the names must not contain one.
# name -> (decoupled weight decay, default state_precision)
_VARIANTS = {
    "adoptim": (False, "full"),
    "adoptimw": (True, "full"),
    "adoptim8bit": (False, "8bit"),
    "adoptimw8bit": (True, "8bit"),
    "adoptimbf16": (False, "bfloat16"),
    "adoptimwbf16": (True, "bfloat16"),
}
NAMES = tuple(_VARIANTS)


def register(registry: Any | None = None) -> tuple[str, ...]:
    """Register :data:`NAMES` (``"adoptim"``, ``"adoptimw"`` and their 8-bit and bfloat16-state forms) in
    timm's optimizer registry; return the names.

    ``registry`` defaults to timm's global one (what ``create_optimizer_v2`` uses). Registering again
    replaces the entries with identical ones, so calling this more than once is harmless.
    """
    try:
        from timm.optim import OptimInfo
        from timm.optim._optim_factory import default_registry
    except ImportError as exc:
        raise ImportError(
            "adoptim.integrations.timm needs timm (and the torchvision that matches your torch): "
            "pip install 'adoptim[timm]'"
        ) from exc
    registry = default_registry if registry is None else registry
    infos = []
    for name, (decoupled, precision) in _VARIANTS.items():
        defaults: dict[str, Any] = {}
        what = "adoptim's ADOPT: reference-exact, clip exponent 0.25, per-parameter steps"
        if decoupled:
            defaults["decoupled_weight_decay"] = True
            what = "adoptim's ADOPT with decoupled weight decay (ADOPTW)"
        if precision != "full":
            defaults["state_precision"] = precision
            what += f", {'8-bit blockwise' if precision == '8bit' else 'bfloat16'} state (stochastic rounding)"
        infos.append(OptimInfo(name=name, opt_class=ADOPT, description=what, has_betas=True,
                               defaults=defaults or None))
    existing = set(registry.list_optimizers())
    for info in infos:
        if info.name in existing and registry.get_optimizer_info(info.name) == info:
            continue  # already ours: re-registering would only make timm log a warning
        registry.register(info)
    return NAMES
