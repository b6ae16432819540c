"""adoptim's ADOPT for Hugging Face's ``Trainer``, configured from its ``TrainingArguments``.

The Trainer's ``optim=`` takes only the names it knows, so ADOPT reaches it through
``Trainer(optimizer_cls_and_kwargs=...)``. :func:`optimizer_cls_and_kwargs` builds that pair from the
arguments as a Trainer user writes them: the learning rate from ``learning_rate`` and the options from
``optim_args``, the Trainer's ``"key=value,key=value"`` string (``optim_args="state_precision=8bit"``,
as for its bitsandbytes optimizers). The Trainer still makes its own param groups (no weight decay for
biases and norm weights, ``weight_decay`` for the rest) and its own scheduler.

Example::

    >>> from transformers import Trainer, TrainingArguments
    >>> from adoptim.integrations.hf import optimizer_cls_and_kwargs
    >>> args = TrainingArguments("out", learning_rate=3e-4, weight_decay=0.1,
    ...                          optim_args="state_precision=8bit,beta2=0.9999")
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
    ...                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args))
"""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer import ADOPT

__all__ = ["OPTIM_ARGS", "optimizer_cls_and_kwargs", "parse_optim_args"]


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def _optional(parse: Any) -> Any:
    return lambda text: None if text.lower() == "none" else parse(text)


_NUMBER, _INT, _FLAG = (float, "a number"), (int, "an integer"), (_bool, "true or false")
# The keys optim_args may hold, how each value is read and what it must look like: ADOPT's keyword
# arguments, and beta1/beta2 for its betas (one value per key: the Trainer's string has no room for a pair).
OPTIM_ARGS: dict[str, tuple[Any, str]] = {
    "lr": _NUMBER, "beta1": _NUMBER, "beta2": _NUMBER, "eps": _NUMBER,
    "decoupled_weight_decay": _FLAG, "clip_exponent": (_optional(float), "a number or none"), "maximize": _FLAG,
    "foreach": (_optional(_bool), "true, false or none"), "fused": (_optional(_bool), "true, false or none"),
    "state_precision": (str, "a name"), "state_block_size": _INT, "state_min_size": _INT,
    "param_rounding": (str, "a name"),
}


def parse_optim_args(optim_args: str | None) -> dict[str, Any]:
    """ADOPT's keyword arguments from a Trainer ``optim_args`` string (``"state_precision=8bit,beta2=0.99"``).

    Raises ``ValueError`` in one line naming the entry when one is not ``key=value``, its key is not in
    :data:`OPTIM_ARGS`, or its value does not read as that key's type.
    """
    out: dict[str, Any] = {}
    betas: dict[str, float] = {}
    for entry in (optim_args or "").replace(" ", "").split(","):
        if not entry:
            continue
        key, sep, text = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"optim_args entry {entry!r} is not key=value")
        if key not in OPTIM_ARGS:
            raise ValueError(f"optim_args key {key!r} is not an ADOPT option; known: {', '.join(OPTIM_ARGS)}")
        parse, what = OPTIM_ARGS[key]
        try:
            value = parse(text)
        except ValueError:
            raise ValueError(f"optim_args {key}={text!r}: expects {what}") from None
        if key in ("beta1", "beta2"):
            betas[key] = value
        else:
            out[key] = value
    if betas:
        out["betas"] = (betas.get("beta1", 0.9), betas.get("beta2", 0.9999))  # ADOPT's defaults for the other
    return out


def optimizer_cls_and_kwargs(args: Any = None, **overrides: Any) -> tuple[type[ADOPT], dict[str, Any]]:
    """``(ADOPT, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)`` from ``TrainingArguments``.

    ``lr`` is ``args.learning_rate``; ``args.optim_args`` is read by :func:`parse_optim_args`; the keyword
    ``overrides`` (ADOPT's arguments) come last. Weight decay is decoupled unless told otherwise, as in the
    Trainer's default AdamW; ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon`` are Adam's and are not read:
    ADOPT keeps its own (0.9, 0.9999) and 1e-6 unless ``optim_args`` or ``overrides`` set them. The
    options are checked here, so a bad one fails before the Trainer starts, with ADOPT's one-line error.
    """
    kwargs: dict[str, Any] = {"decoupled_weight_decay": True}
    if args is not None:
        kwargs["lr"] = args.learning_rate
        kwargs.update(parse_optim_args(getattr(args, "optim_args", None)))
    kwargs.update(overrides)
    ADOPT([torch.zeros(1, requires_grad=True)], **kwargs)  # ADOPT's own checks, on a stand-in parameter
    return ADOPT, kwargs
