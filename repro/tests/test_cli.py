"""The command line: list, python -m, and the optimizer factory behind the names."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from adoptim import ADOPT
from adoptim_repro import registry
from adoptim_repro.optimizers import OPTIMIZERS, OptimSpec, make_optimizer


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
