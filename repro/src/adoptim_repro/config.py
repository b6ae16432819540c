"""Experiment configs: dataclasses resolved from defaults, a ``--quick`` preset and ``--set key=value``.

Every experiment's config is a dataclass whose defaults follow the paper. Fields may be ``int``,
``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]`` (written ``a,b,c``), or a mapping from an
optimizer name to :class:`adoptim_repro.optimizers.OptimSpec` (written ``adam.lr=1e-3``). Each field
has a one-line docstring under it (what ``adoptim <experiment> --help`` shows). A config may define
``validate(self) -> None`` that raises :class:`ConfigError` for impossible values, and a class variable
``OPTIMIZERS`` when it runs only some of :data:`~.optimizers.OPTIMIZERS`.

Values come, in this order, from the defaults, the ``--quick`` preset, a ``--config FILE`` (TOML, or
YAML with PyYAML installed), ``--seeds`` and ``--set key=value``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
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


def resolve(cls: type, overrides: Iterable[tuple[str, Any]] = (), validate: bool = True) -> Any:
    """Build a ``cls`` config from its defaults and ``(key, value)`` overrides, applied in order.

    A value given as ``str`` is parsed by the field's type (command-line form); any other value is
    type-checked. Keys ``NAME.attr`` set one attribute of an optimizer's :class:`OptimSpec`.
    Raises :class:`ConfigError` (one line) for an unknown key, a wrong type or (unless not
    ``validate``) an impossible value.
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
    if validate:
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
    runs = getattr(type(cfg), "OPTIMIZERS", OPTIMIZERS)
    for name in getattr(cfg, "optimizers", ()):
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r} in 'optimizers'; known: {', '.join(OPTIMIZERS)}")
        if name not in runs:
            raise ConfigError(f"this experiment runs only {', '.join(runs)}, not {name!r} (config key 'optimizers')")
    for name in getattr(cfg, "optimizers", ()):
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


def parse_set(items: Iterable[str | Iterable[str]]) -> list[tuple[str, str]]:
    """Split the ``key=value`` strings of ``--set`` (each ``--set`` may give several)."""
    out = []
    for group in items:
        for item in [group] if isinstance(group, str) else group:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set expects key=value, got {item!r}")
            out.append((key.strip(), value.strip()))
    return out


# --------------------------------------------------------------------------- config files
def read_config_file(path: str | Path) -> list[tuple[str, Any]]:
    """The ``(key, value)`` overrides in a TOML or YAML file.

    Top-level keys are config keys; per-optimizer settings go in a table per optimizer (``[adam]``
    with ``lr = 1e-3``), under ``[optim.adam]``, or as ``"adam.lr"`` keys. ``--print-config`` writes
    such a file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"--config {path}: the file must end in .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                              "file as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of key = value, got {type(data).__name__}")
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key == "optim" and isinstance(value, dict):
            for name, spec in value.items():
                if not isinstance(spec, dict):
                    raise ConfigError(f"--config {path}: optim.{name} must be a table of settings")
                out += [(f"{name}.{attr}", v) for attr, v in spec.items()]
        elif key in OPTIMIZERS and isinstance(value, dict):
            out += [(f"{key}.{attr}", v) for attr, v in value.items()]
        else:
            out.append((str(key), value))
    return out


def _toml_value(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Any) -> str:
    """The config as a TOML file that ``--config`` reads back to the same config (``None`` as "none")."""
    data = to_dict(cfg)
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            for name, spec in value.items():
                tables += ["", f"[{key}.{json.dumps(name) if '-' in name else name}]"]
                tables += [f"{attr} = {_toml_value(v)}" for attr, v in spec.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + tables) + "\n"


# --------------------------------------------------------------------------- help
def field_help(cls: type) -> dict[str, str]:
    """Each field's one-line docstring (the string literal written under it in the class body)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, after in zip(body, body[1:] + [None], strict=True):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            out[node.target.id] = " ".join(after.value.value.split())
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("adoptim_repro.optimizers.", "")


def describe(cls: type) -> str:
    """Every config key of ``cls`` with its type, default and meaning: the key list of ``--help``."""
    helps = field_help(cls)
    cfg = cls()
    lines = []
    for name, tp in _field_types(cls).items():
        value = getattr(cfg, name)
        if isinstance(value, dict):
            shown = "".join(f"\n        {k}: lr={v.lr:g}, betas={tuple(v.betas)}, eps={v.eps:g}, "
                            f"weight_decay={v.weight_decay:g}"
                            for k, v in value.items() if k in getattr(cfg, "optimizers", value))
            lines.append(f"  {name}  (NAME.lr, NAME.betas, NAME.eps, NAME.weight_decay)\n      {helps.get(name, '')}"
                         f"\n      default:{shown}")
            continue
        default = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"  {name}  ({_type_name(tp)}, default {default})\n      {helps.get(name, '')}")
    return "\n".join(lines)
