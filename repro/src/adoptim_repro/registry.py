"""The experiments ``adoptim`` knows: each is a module ``adoptim_repro.<name>`` with ``EXPERIMENT``."""

from __future__ import annotations

import importlib
import importlib.util

from .runner import Experiment

# The order ``adoptim list`` shows. A name whose module is not there yet is skipped.
EXPERIMENT_MODULES = ("toy", "mnist", "vae", "gpt", "llama", "cifar10", "imagenet", "rl")

# Wall-clock run times, the one place they are kept (``adoptim list`` and ``--help`` print them; the docs
# point here). With the default thread count (2) unless they say --threads 1, on the project's 2-core AMD
# EPYC virtual machine: "idle" runs had the machine to themselves; "load 3-5" ran beside other jobs, and on
# two cores that costs a factor of 2 to 4 (torch's two threads wait for each other). The --quick times and
# the toy default were measured with /usr/bin/time on the dates given; the other defaults are the
# measurements recorded with the results they produced (the commits of those dates).
_LOADED = "2026-12-03, load 3-5"
RUN_TIMES: dict[str, str] = {
    "toy": f"default 3.6 min idle (measured 2026-11-28), 7.4 min at load 3-4 (measured {_LOADED}); --quick "
           f"7.7 min at load 4-5 (measured {_LOADED}; it runs uncompiled, the default compiles)",
    "mnist": "default 24 min with --threads 1 at load 2-4 (5 seeds as one ensemble per optimizer, measured "
             "2026-12-03); --quick 19 s at load 1-2 (measured 2026-12-04)",
    "vae": "default 19 min with --threads 1 at load 2-4 (8 seeds as one ensemble per optimizer, measured "
           "2026-12-03); --quick 27 s at load 1-2 (measured 2026-12-04)",
    "gpt": f"default (5 seeds) 49 min with --threads 1 at load 2-3 (measured 2026-12-04); --quick 7 s (measured "
           f"{_LOADED})",
    "llama": f"default (3 seeds) 20 min per seed at load (measured 2026-11-28); --quick 11 s (measured {_LOADED})",
    "cifar10": f"default 62 min for the six runs at load (measured 2026-11-28); --quick 42 s (measured {_LOADED})",
    "imagenet": "not measured (checked 2026-12-03: the measuring machine has no torchvision); the full scale "
                "is days on 8 GPUs",
    "rl": "default 17 min with --threads 1 as two processes, one per environment (HalfCheetah-v5 11.4 min, Ant-v5 "
          "16.8 min, side by side at load about 2; about 28 min as one process), --quick 9 s (both measured "
          "2026-12-03)",
}


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
