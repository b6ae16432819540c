"""Experiment configs: dataclasses resolved from defaults, a ``--quick`` preset and ``--set key=value``.

Every experiment's config is a dataclass whose defaults follow the paper. Fields may be ``int``,
``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]`` (written ``a,b,c``), or a mapping from an
optimizer name to :class:`adoptim_repro.optimizers.OptimSpec` (written ``adam.lr=1e-3``).
A config may define ``validate(self) -> None`` that raises :class:`ConfigError` for impossible values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .optimizers import OPTIMIZERS, OptimSpec


class ConfigError(ValueError):
    """A config that cannot run: the message is one line naming the key and what was wrong."""


def _parse_scalar(tp: Any, text: str, key: str) -> Any:
    want = getattr(tp, "__name__", str(tp))
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} expects a bool (true/false), got {text!r}")
    if tp is int:
        try:
            value = float(text)  # accepts 2e6 for an integer count
        except ValueError:
            raise ConfigError(f"config key {key!r} expects an int, got {text!r}") from None
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"config key {key!r} expects an int, got {text!r}")
        return int(value)
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"config key {key!r} expects a float, got {text!r}") from None
        if math.isnan(value):  # passes every range check (all comparisons are false) and never resumes
            raise ConfigError(f"config key {key!r} expects a number, got {text!r}")
        return value
    if tp is str:
        return text
    raise ConfigError(f"config key {key!r} has type {want}, which cannot be set from the command line")


def parse_value(tp: Any, text: str, key: str) -> Any:
    """Parse ``text`` as a value of the annotated type ``tp``; raise :class:`ConfigError` if it is not."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.strip().lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        return parse_value(rest[0], text, key)
    if origin is tuple:
        items = [s for s in text.split(",") if s.strip() != ""]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(args[0], s.strip(), key) for s in items)
        if len(items) != len(args):
            raise ConfigError(f"config key {key!r} expects {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(a, s.strip(), key) for a, s in zip(args, items, strict=True))
    return _parse_scalar(tp, text, key)


def _check_type(tp: Any, value: Any, key: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) a value given in Python, e.g. a preset."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"config key {key!r} expects {tp}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _check_type(rest[0], value, key)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_check_type(a, v, key) for a, v in zip(args, value, strict=True))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise bad
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def resolve(cls: type, overrides: Iterable[tuple[str, Any]] = ()) -> Any:
    """Build a ``cls`` config from its defaults and ``(key, value)`` overrides, applied in order.

    A value given as ``str`` is parsed by the field's type (command-line form); any other value is
    type-checked. Keys ``NAME.attr`` set one attribute of an optimizer's :class:`OptimSpec`.
    Raises :class:`ConfigError` (one line) for an unknown key, a wrong type or an impossible value.
    """
    types_ = _field_types(cls)
    cfg = cls()
    for key, value in overrides:
        name, _, attr = key.partition(".")
        if attr:
            _set_optim(cfg, types_, name, attr, value, key)
            continue
        if name not in types_:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(types_))}")
        tp = types_[name]
        if typing.get_origin(tp) in (dict, Mapping) or tp is dict:
            raise ConfigError(f"config key {key!r} is a table; set one entry as NAME.attr=value (e.g. adam.lr=1e-3)")
        parsed = parse_value(tp, value, key) if isinstance(value, str) and tp is not str else value
        setattr(cfg, name, _check_type(tp, parsed, key))
    check(cfg)
    return cfg


def _set_optim(cfg: Any, types_: dict[str, Any], name: str, attr: str, value: Any, key: str) -> None:
    table = getattr(cfg, "optim", None)
    if "optim" not in types_ or not isinstance(table, dict):
        raise ConfigError(f"unknown config key {key!r}; this experiment has no per-optimizer settings")
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r} in {key!r}; known: {', '.join(OPTIMIZERS)}")
    spec = table.get(name, OptimSpec())
    spec_types = _field_types(OptimSpec)
    if attr not in spec_types:
        raise ConfigError(f"unknown optimizer setting {key!r}; known: {', '.join(spec_types)}")
    tp = spec_types[attr]
    parsed = parse_value(tp, value, key) if isinstance(value, str) else value
    table[name] = dataclasses.replace(spec, **{attr: _check_type(tp, parsed, key)})


def check_evaluations_at_logs(eval_every: int, log_every: int) -> None:
    """For loops that evaluate only at logged steps: any other ``eval_every`` would skip some silently."""
    if eval_every % log_every:
        raise ValueError(f"config key 'eval_every' ({eval_every}) must be a multiple of 'log_every' ({log_every})")


def check(cfg: Any) -> None:
    """Common checks (seeds, optimizer names and settings), then the config's own ``validate``."""
    seeds = getattr(cfg, "seeds", 1)
    if seeds < 1:
        raise ConfigError(f"config key 'seeds' must be >= 1, got {seeds}")
    for name in getattr(cfg, "optimizers", ()):
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r} in 'optimizers'; known: {', '.join(OPTIMIZERS)}")
        table = getattr(cfg, "optim", None)
        if isinstance(table, dict) and name not in table:
            raise ConfigError(f"optimizer {name!r} has no settings; give them as {name}.lr=... etc.")
    for name, spec in (getattr(cfg, "optim", None) or {}).items():
        try:
            spec.check()
        except ValueError as e:
            raise ConfigError(f"optimizer {name!r}: {e}") from None
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists)."""
    return dataclasses.asdict(cfg)


def parse_set(items: Iterable[str]) -> list[tuple[str, str]]:
    """Split ``key=value`` strings from ``--set``."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out.append((key.strip(), value.strip()))
    return out
