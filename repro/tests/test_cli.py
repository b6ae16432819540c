"""The command line: list, python -m, its flags (--set, --config, --print-config, --version, --help), and the
optimizer factory behind the names."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adoptim import ADOPT
from adoptim_repro import cli, registry
from adoptim_repro.config import ConfigError, field_help, parse_set, resolve
from adoptim_repro.optimizers import OPTIMIZERS, OptimSpec, make_optimizer
from repro_helpers import run_cli


def test_list_prints_one_line_per_experiment_with_its_full_scale():
    out = subprocess.run([sys.executable, "-m", "adoptim_repro", "list"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert {"toy", "mnist", "vae"} <= set(names)
    assert len(names) == len(set(names)) == len(registry.available())
    for line in lines:
        if line.split()[0] in ("toy", "mnist", "vae"):
            assert "[full scale: " in line


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_name_builds_and_steps(name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer(name, [p], OptimSpec(lr=0.1, weight_decay=0.01))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
    assert float(p.detach().max()) < 1.0


def test_names_map_to_the_intended_variants():
    p = [torch.nn.Parameter(torch.ones(1))]
    spec = OptimSpec(betas=(0.8, 0.95), weight_decay=0.1)
    assert make_optimizer("amsgrad", p, spec).defaults["amsgrad"] is True
    assert make_optimizer("adam", p, spec).defaults["amsgrad"] is False
    adopt, noclip, adoptw = (make_optimizer(n, p, spec) for n in ("adopt", "adopt-noclip", "adoptw"))
    assert isinstance(adopt, ADOPT) and adopt.defaults["clip_exponent"] == 0.25
    assert noclip.defaults["clip_exponent"] is None
    assert adoptw.defaults["decoupled_weight_decay"] and not adopt.defaults["decoupled_weight_decay"]
    assert adopt.defaults["betas"] == (0.8, 0.95) and adopt.defaults["weight_decay"] == 0.1
    assert isinstance(make_optimizer("adamax", p, spec), torch.optim.Adamax)
    assert isinstance(make_optimizer("adamw", p, spec), torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", p, spec)


# -- flags ---------------------------------------------------------------------------------------------
SMALL = ["steps=200", "runs=4", "ks=10", "beta2s=0.5", "log_points=4", "compile=false", "optimizers=adam,adopt"]


def _config(out):
    return json.loads((out / "config.json").read_text())["config"]


def test_one_set_takes_several_key_values(tmp_path):
    out = tmp_path / "o"
    assert run_cli("toy", "--set", *SMALL, "--set", "adam.lr=0.02", "lr_decay=0.5", "--out", out) == 0
    cfg = _config(out)
    assert (cfg["steps"], cfg["runs"], cfg["ks"], cfg["lr_decay"]) == (200, 4, [10], 0.5)
    assert cfg["optim"]["adam"]["lr"] == 0.02


def _readme_commands() -> list[list[str]]:
    """Every ``adoptim ...`` (or ``-m adoptim_repro ...``) command in the code of the README and the docs."""
    root = Path(__file__).resolve().parents[2]
    commands = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        if not page.is_file():
            continue
        text = page.read_text(encoding="utf-8")
        fenced = re.findall(r"^ *```[^\n]*\n(.*?)^ *```", text, re.M | re.S)
        indented = [line for line in re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S).splitlines()
                    if line.startswith("    ")]
        code = re.sub(r"\\\n\s*", " ", "\n".join(fenced + indented))  # join continued lines
        lines = [part.strip() for line in code.splitlines()
                 for part in re.split(r"&&|;|&(?!>)", line.split(" #")[0].strip().removeprefix("$ "))]
        for line in lines:  # each command of a shell line (a ';' or '&&' list, a '&' in the background)
            if line.startswith("adoptim "):
                argv = shlex.split(line)[1:]
            elif "-m adoptim_repro " in line:
                argv = shlex.split(line.split("-m adoptim_repro ", 1)[1])
            else:
                continue
            if any(c in line for c in "[]<>|") or "..." in line:  # a usage synopsis, not a command
                continue
            if argv and argv[0] in registry.EXPERIMENT_MODULES:
                commands.append(argv)
    return commands


def test_the_documented_commands_parse_and_name_real_config_keys():
    commands = _readme_commands()
    assert commands, "no adoptim commands found in README.md or docs/"
    for argv in commands:
        args = cli._parser().parse_args(argv)
        exp = registry.load(args.experiment)
        overrides = list(exp.quick.items()) if args.quick else []
        try:  # keys and types only: paths in the docs are placeholders
            resolve(exp.config, overrides + parse_set(args.sets), validate=False)
        except ConfigError as e:
            raise AssertionError(f"documented command 'adoptim {' '.join(argv)}': {e}") from None


@pytest.mark.parametrize("name", registry.names())
def test_every_experiment_docstring_states_its_claim_and_the_command_that_runs_it(name):
    doc = importlib.import_module(f"adoptim_repro.{name}").__doc__ or ""
    assert re.search(r"\bclaim\b", doc, re.I), f"{name}: the module docstring states no claim"
    literals = [" ".join(c.split()) for c in re.findall(r"``(adoptim [^`]+)``", doc)]
    commands = [c for c in literals if re.fullmatch(rf"adoptim {name}( .*)?", c)]
    assert commands, f"{name}: the module docstring gives no ``adoptim {name}`` command: {literals}"
    exp = registry.load(name)
    for command in commands:  # each one parses and names real config keys
        args = cli._parser().parse_args(shlex.split(command)[1:])
        overrides = list(exp.quick.items()) if args.quick else []
        try:
            resolve(exp.config, overrides + parse_set(args.sets), validate=False)
        except ConfigError as e:
            raise AssertionError(f"{name}'s docstring command {command!r}: {e}") from None


def test_config_file_toml_then_set_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('steps = 200\nruns = 4\nks = [10]\nbeta2s = [0.5]\nlog_points = 4\ncompile = false\n'
                    'optimizers = ["adam", "adopt"]\nlr_decay = 0.25\n\n[adam]\nlr = 0.02\n\n[optim.adopt]\n'
                    'eps = 1e-5\n')
    out = tmp_path / "o"
    assert run_cli("toy", "--config", path, "--set", "lr_decay=0.5", "--out", out) == 0
    cfg = _config(out)
    assert (cfg["steps"], cfg["ks"], cfg["lr_decay"]) == (200, [10], 0.5)  # --set wins over the file
    assert cfg["optim"]["adam"]["lr"] == 0.02 and cfg["optim"]["adopt"]["eps"] == 1e-5


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="PyYAML is not installed")
def test_config_file_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 300\nadopt.lr: 1e-3\noptimizers: [adopt]\n")  # YAML 1.1 reads 1e-3 as text
    cfg = cli._config(registry.load("toy"), cli._parser().parse_args(["toy", "--config", str(path)]))
    assert cfg.steps == 300 and cfg.optim["adopt"].lr == 1e-3 and cfg.optimizers == ("adopt",)


@pytest.mark.parametrize("name,text,message", [
    ("c.yaml", "steps: 3\n", "reading YAML needs PyYAML (pip install pyyaml)"),
    ("c.toml", "steps = \n", "not valid TOML"),
    ("c.toml", "stepz = 3\n", "unknown config key 'stepz'"),
    ("c.toml", "steps = 'many'\n", "config key 'steps' expects an int, got 'many'"),
    ("c.json", "{}", "must end in .toml, .yaml or .yml"),
    ("c.toml", "[optim]\nadam = 3\n", "optim.adam must be a table"),
])
def test_a_bad_config_file_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch, name, text, message):
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    path = tmp_path / name
    path.write_text(text)
    assert run_cli("toy", "--config", path, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", registry.names())
def test_print_config_round_trips_through_config_and_runs_nothing(name, tmp_path, capsys):
    exp = registry.load(name)
    sets = ["--set", "seeds=2"] + (["--set", "adopt.lr=0.003", "optimizers=adam,adopt"] if name != "llama" else [])
    argv = [name, "--quick", *sets, "--out", str(tmp_path / "o"), "--print-config"]
    if name == "imagenet":
        pytest.importorskip("timm")
    if registry.missing(exp):
        pytest.skip(registry.missing(exp))
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.toml").write_text(text)
    want = cli._config(exp, cli._parser().parse_args(argv[:-3]))
    got = cli._config(exp, cli._parser().parse_args([name, "--config", str(tmp_path / "c.toml")]))
    assert got == want
    assert not (tmp_path / "o").exists()


def test_version_names_both_packages(capsys):
    import adoptim
    import adoptim_repro

    with pytest.raises(SystemExit) as e:
        run_cli("--version")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == (f"adoptim-repro {adoptim_repro.__version__} "
                                               f"(adoptim {adoptim.__version__}, torch {torch.__version__})")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'version = "{adoptim_repro.__version__}"' in pyproject


@pytest.mark.parametrize("name", registry.names())
def test_experiment_help_lists_every_config_key_with_type_default_and_meaning(name, capsys):
    exp = registry.load(name)
    helps = field_help(exp.config)
    fields = [f.name for f in dataclasses.fields(exp.config)]
    assert set(helps) == set(fields), f"config keys without a one-line docstring: {set(fields) - set(helps)}"
    with pytest.raises(SystemExit):
        run_cli(name, "--help")
    out = capsys.readouterr().out
    defaults = exp.config()
    for key in fields:
        value = getattr(defaults, key)
        if isinstance(value, dict):
            assert f"  {key}  (NAME.lr, NAME.betas, NAME.eps, NAME.weight_decay)" in out
        else:
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            assert re.search(rf"^  {key}  \(.+, default {re.escape(str(shown))}\)$", out, re.M), key
        assert helps[key] in " ".join(out.split())
    assert registry.run_time(name) in " ".join(out.split())


# -- what list says ------------------------------------------------------------------------------------
def test_an_experiment_whose_packages_are_missing_is_listed_unavailable_and_refused_first(tmp_path, capsys,
                                                                                         monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchvision" else real(n, *a))
    listed = registry.available()["imagenet"]
    assert isinstance(listed, ImportError) and "needs torchvision, which is not installed" in str(listed)
    assert run_cli("list") == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("imagenet"))
    assert "(unavailable: needs torchvision" in line
    assert run_cli("imagenet", "--quick", "--out", tmp_path / "o") == 2
    assert "experiment 'imagenet' needs torchvision" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_times_have_one_source_a_dated_measurement_in_the_registry(capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    duration = re.compile(r"\b\d+(\.\d+)?\s*(min|minutes|h|hours|s)\b")
    for name in registry.names():
        exp = registry.load(name)
        dated = r"measured \d{4}-\d{2}-\d{2}|not measured \(checked \d{4}-\d{2}-\d{2}"
        assert re.search(dated, registry.run_time(name)), (name, registry.run_time(name))
        # nowhere else: the one-line summary, the full-scale note and the config docs name no duration
        for text in (exp.summary, exp.paper_scale, exp.config.__doc__ or "", *field_help(exp.config).values()):
            assert not duration.search(text), (name, text)
        if not registry.missing(exp):
            assert f"[run time: {registry.run_time(name)}]" in out
    # nor the experiments' pages and the README's lines about ``adoptim``: they point to ``adoptim list``.
    # A sweep's page is generated from that sweep's summary.json, and its Cost section is that summary's own
    # measurement of the sweep (not of an experiment): the one place a duration may stand.
    root = Path(__file__).resolve().parents[2]
    for page in [root / "README.md", *sorted((root / "docs" / "reproduction").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        if "Generated by `adoptim sweep" in text:
            text, _, cost = text.partition("\n## Cost\n")
            assert duration.search(cost), (page.name, "a sweep page's Cost section gives the sweep's time")
            assert "\n## " not in cost, (page.name, "the Cost section is the generated page's last")
        for line in text.splitlines():
            if page.name != "README.md" or "adoptim " in line:
                assert not duration.search(line), (page.name, line)
