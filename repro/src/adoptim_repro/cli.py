"""``adoptim``: run the paper's experiments from the command line.

    adoptim list
    adoptim <experiment> [--quick] [--seeds N] [--out DIR] [--device cpu|cuda] [--set key=value ...]
    adoptim demo          # toy --quick and mnist --quick

Also runs as ``python -m adoptim_repro`` and under ``torchrun --nproc_per_node N -m adoptim_repro <experiment>``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import registry
from .config import ConfigError, parse_set, resolve
from .runner import Experiment, run_experiment


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adoptim", description="Reproduce the experiments of the ADOPT paper (arXiv 2411.02853).",
        epilog="'adoptim list' shows the experiments; 'adoptim demo' runs toy and mnist quickly.")
    p.add_argument("experiment", help="an experiment name, 'list' or 'demo'")
    p.add_argument("--quick", action="store_true", help="the small preset (minutes on a laptop CPU)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default results/<experiment>[-quick]); rerun to resume")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set steps=1000 --set adopt.lr=3e-3")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between checkpoints of a running unit (default 60)")
    return p


def _list() -> int:
    for name, exp in registry.available().items():
        if isinstance(exp, Exception):
            print(f"{name:9s} (unavailable: {exp})")
        else:
            print(f"{name:9s} {exp.summary} [full scale: {exp.paper_scale}]")
    return 0


def _config(exp: Experiment, args: argparse.Namespace) -> object:
    overrides = list(exp.quick.items()) if args.quick else []
    if args.seeds is not None:
        overrides.append(("seeds", args.seeds))
    overrides += parse_set(args.sets)
    return resolve(exp.config, overrides)


def _check_device(device: str) -> None:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")


def _run_one(name: str, args: argparse.Namespace) -> int:
    try:
        exp = registry.load(name)
    except KeyError:
        known = ", ".join(registry.names())
        raise ConfigError(f"unknown experiment {name!r}; known: {known} (or list, demo)") from None
    cfg = _config(exp, args)
    _check_device(args.device)
    if not args.checkpoint_every >= 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 seconds, got {args.checkpoint_every}")
    out = args.out or Path("results") / (name + ("-quick" if args.quick else ""))
    run_experiment(exp, cfg, out, device=args.device, checkpoint_every=args.checkpoint_every)
    return 0


def _demo(args: argparse.Namespace) -> int:
    base = args.out or Path("results") / "demo"
    for name in ("toy", "mnist"):
        sub = argparse.Namespace(**{**vars(args), "quick": True, "out": base / name})
        _run_one(name, sub)
    for name in ("toy", "mnist"):
        print("\n" + (base / name / "summary.md").read_text().strip())
    print(f"demo results: {base / 'toy'}/summary.md and {base / 'mnist'}/summary.md (plots beside them)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adoptim`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.experiment == "list":
            return _list()
        if args.experiment == "demo":
            return _demo(args)
        return _run_one(args.experiment, args)
    except ConfigError as e:
        print(f"adoptim: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("adoptim: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
