"""``adoptim``: run the paper's experiments from the command line.

    adoptim list                  # the experiments, what each needs, and their measured run times
    adoptim <experiment> [--quick] [--seeds N] [--out DIR] [--device cpu|cuda] [--config FILE]
                         [--set key=value ...] [--threads N] [--fresh] [--tensorboard] [--print-config]
    adoptim <experiment> --help   # every config key with its type, default and meaning
    adoptim demo                  # toy --quick and mnist --quick
    adoptim sweep mnist|vae|gpt [--quick] [--set beta2s=... lrs=...] [--shard I/N]   # beta2 x lr grids, many seeds
    adoptim --version

Also runs as ``python -m adoptim_repro`` and under ``torchrun --nproc_per_node N -m adoptim_repro <experiment>``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, registry
from .config import ConfigError, describe, parse_set, read_config_file, resolve, to_toml
from .runner import Experiment, run_experiment


def _version() -> str:
    import torch

    import adoptim

    return f"adoptim-repro {__version__} (adoptim {adoptim.__version__}, torch {torch.__version__})"


def _parser(exp: Experiment | None = None) -> argparse.ArgumentParser:
    epilog = ("'adoptim list' shows the experiments; 'adoptim demo' runs toy and mnist quickly; "
              "'adoptim sweep --help' the beta2 and lr sweeps.")
    if exp is not None:
        quick = ", ".join(f"{k}={v}" for k, v in exp.quick.items())
        epilog = (f"{exp.name}: {exp.summary}\nrun time: {registry.run_time(exp.name)}\n\n"
                  f"config keys (--set KEY=VALUE, or KEY = VALUE in a --config file):\n{describe(exp.config)}\n\n"
                  f"--quick sets: {quick}")
    p = argparse.ArgumentParser(
        prog="adoptim", description="Reproduce the experiments of the ADOPT paper (arXiv 2411.02853).",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="an experiment name, 'list' or 'demo'")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--quick", action="store_true",
                   help="the small preset: proves the code path in minutes, not the paper's claim")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="run seeds 0..N-1")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default results/<experiment>[-quick]); rerun to resume")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="config keys from a TOML file (or YAML, with PyYAML installed); --set overrides them")
    p.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set steps=1000 adopt.lr=3e-3")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML (a --config file) and exit without running")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (results depend on it; it is recorded in config.json)")
    p.add_argument("--fresh", action="store_true",
                   help="remove the results already in --out and start over (instead of resuming)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard events under OUT/tensorboard "
                        "(pip install 'adoptim-repro[tensorboard]')")
    p.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between checkpoints of a running unit (default 60)")
    return p


def _list() -> int:
    for name, exp in registry.available().items():
        if isinstance(exp, Exception):
            print(f"{name:9s} (unavailable: {exp})")
        else:
            print(f"{name:9s} {exp.summary} [full scale: {exp.paper_scale}] [run time: {registry.run_time(exp.name)}]")
    return 0


def _load(name: str) -> Experiment:
    try:
        exp = registry.load(name)
    except KeyError:
        known = ", ".join(registry.names())
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join([known, 'list', 'demo'])}") from None
    except ImportError as e:
        raise ConfigError(f"experiment {name!r} cannot be imported here ({e})") from None
    reason = registry.missing(exp)
    if reason:
        raise ConfigError(f"experiment {name!r} {reason}")
    return exp


def _config(exp: Experiment, args: argparse.Namespace) -> object:
    overrides = list(exp.quick.items()) if args.quick else []
    if args.config is not None:
        overrides += read_config_file(args.config)
    if args.seeds is not None:
        overrides.append(("seeds", args.seeds))
    overrides += parse_set(args.sets)
    return resolve(exp.config, overrides)


def _check_run_flags(args: argparse.Namespace) -> None:
    import torch

    device = args.device
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
    if not args.checkpoint_every >= 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 seconds, got {args.checkpoint_every}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'adoptim-repro[tensorboard]'")


def _run_one(name: str, args: argparse.Namespace) -> int:
    exp = _load(name)
    cfg = _config(exp, args)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    _check_run_flags(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or Path("results") / (name + ("-quick" if args.quick else ""))
    run_experiment(exp, cfg, out, device=args.device, checkpoint_every=args.checkpoint_every, quick=args.quick,
                   fresh=args.fresh, tensorboard=args.tensorboard)
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


def _experiment_of(argv: Sequence[str]) -> Experiment | None:
    """The experiment named in ``argv`` (for its ``--help``), or None."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first not in registry.EXPERIMENT_MODULES:
        return None
    try:
        return registry.load(first)
    except (KeyError, ImportError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adoptim`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from . import sweep

        return sweep.main(argv[1:])
    exp = _experiment_of(argv) if ("-h" in argv or "--help" in argv) else None
    args = _parser(exp).parse_args(argv)
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
