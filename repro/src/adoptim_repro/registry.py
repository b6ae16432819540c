"""The experiments ``adoptim`` knows: each is a module ``adoptim_repro.<name>`` with ``EXPERIMENT``."""

from __future__ import annotations

import importlib
import importlib.util

from .runner import Experiment

# The order ``adoptim list`` shows. A name whose module is not there yet is skipped.
EXPERIMENT_MODULES = ("toy", "mnist", "vae", "gpt", "llama", "cifar10", "imagenet", "rl")

# Wall-clock run times, the one place they are kept (``adoptim list`` and ``--help`` print them; the docs
# point here). Measured with the default thread count (2) on a 2-core AMD EPYC virtual machine; the
# machine's load at the time is given, since a loaded machine runs slower than an idle one.
RUN_TIMES: dict[str, str] = {}


def run_time(name: str) -> str:
    """The measured run time of experiment ``name`` (default and ``--quick``), with where and when."""
    return RUN_TIMES.get(name, "not measured")


def load(name: str) -> Experiment:
    """The experiment called ``name``; KeyError if there is none, ImportError if it cannot import."""
    if name not in EXPERIMENT_MODULES:
        raise KeyError(name)
    modname = f"{__package__}.{name}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise KeyError(name) from None
        raise
    return module.EXPERIMENT


def names() -> list[str]:
    """The registered experiments whose module exists, found without importing them."""
    return [n for n in EXPERIMENT_MODULES if importlib.util.find_spec(f"{__package__}.{n}") is not None]


def missing(exp: Experiment) -> str | None:
    """Why ``exp`` cannot run in this environment (a package it needs is not installed), or ``None``.

    Packages are looked up, not imported, so ``adoptim list`` stays fast.
    """
    for module, hint in exp.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"needs {module}, which is not installed: {hint}"
    return None


def available() -> dict[str, Experiment | Exception]:
    """Every registered experiment, or the error that keeps it from loading or running here."""
    out: dict[str, Experiment | Exception] = {}
    for name in EXPERIMENT_MODULES:
        try:
            exp = load(name)
        except KeyError:
            continue
        except ImportError as e:
            out[name] = e
            continue
        reason = missing(exp)
        out[name] = ImportError(reason) if reason else exp
    return out
