"""The migration page (docs/migration.md), checked against the installed ports it describes.

The claims are read from the page's comparison table, not restated here: every row marked
*(measured)* is parsed, cell by cell, and compared with what the installed package does. Editing a cell
so that it no longer holds (or marking a row *(measured)* that nothing checks) fails a test here.

The clip bound is measured on a probe whose outcome has a closed form: with beta1 = 0, p0 = 0 and a huge
gradient at every update, the update t moves p by exactly ``-lr * bound(t)``, so the bound each port
applies can be read off ``p``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adoptim import ADOPT
from adoptim.integrations.pytorch_optimizer import convert_state_dict

PAGE = Path(__file__).resolve().parents[2] / "docs" / "migration.md"
LR = 0.1
MEASURED = "*(measured)*"


# ------------------------------------------------------------------ the page's table

def comparison_table(text: str) -> dict[str, dict[str, str]]:
    """{row label: {column header: cell}} of the table whose first column header is empty."""
    lines = [line.strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*\|\s*adoptim\s*\|", line))
    split = lambda line: [cell.strip() for cell in line.strip("|").split("|")]
    headers = split(lines[start])[1:]
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        label, *cells = split(line)
        assert len(cells) == len(headers), f"row {label!r} has {len(cells)} cells for {len(headers)} columns"
        table[label] = dict(zip(headers, cells))
    return table


TABLE = comparison_table(PAGE.read_text())


def claim(row: str, port: str) -> str:
    """The page's cell for ``port`` in the measured row whose label starts with ``row``."""
    labels = [label for label in TABLE if label.startswith(row)]
    assert len(labels) == 1, f"docs/migration.md: no single row starting {row!r} (rows: {list(TABLE)})"
    assert labels[0].endswith(MEASURED), f"row {labels[0]!r} is checked here: mark it {MEASURED}"
    cell = next((cell for header, cell in TABLE[labels[0]].items() if header.startswith(port)), None)
    assert cell is not None, f"docs/migration.md: no column for {port!r}"
    return cell


# ------------------------------------------------------------------ the ports

@dataclass(frozen=True)
class Port:
    column: str  # how the column header starts
    distribution: str  # the package whose version the header names
    load: Callable[[], type]
    decoupled: str  # its name for decoupled weight decay


def _torch_adopt() -> type:
    return pytest.importorskip("adopt").ADOPT


def _timm() -> type:
    return pytest.importorskip("timm.optim.adopt", exc_type=ImportError).Adopt


def _pytorch_optimizer() -> type:
    return pytest.importorskip("pytorch_optimizer").ADOPT


def _heavyball() -> type:
    return pytest.importorskip("heavyball").ADOPT


PORTS = {
    "adoptim": Port("adoptim", "adoptim", lambda: ADOPT, "decoupled_weight_decay"),
    "torch-adopt": Port("torch-adopt", "torch-adopt", _torch_adopt, "decouple"),
    "timm": Port("timm", "timm", _timm, "decoupled"),
    "pytorch_optimizer": Port("pytorch_optimizer", "pytorch_optimizer", _pytorch_optimizer, "weight_decouple"),
    "heavyball": Port("HeavyBall", "heavyball", _heavyball, ""),
}
MARKS = {"timm": [pytest.mark.timm]}


def ports(*names: str) -> list:
    return [pytest.param(PORTS[n], id=n, marks=MARKS.get(n, [])) for n in names]


OTHERS = ("torch-adopt", "timm", "pytorch_optimizer")
ALL = ("adoptim", *OTHERS)


def test_every_measured_row_is_checked():
    checked = {"defaults", "clip bound", "a parameter whose gradient starts late", "decoupled decay on the first",
               "`step()` changes", "fused step", "checkpoint group keys"}
    for label in TABLE:
        if label.endswith(MEASURED):
            assert any(label.startswith(c) for c in checked), f"{label!r} is marked measured, but nothing checks it"


@pytest.mark.parametrize("port", ports("torch-adopt", "timm", "pytorch_optimizer", "heavyball"))
def test_column_names_the_installed_version(port: Port):
    header = next(h for h in TABLE[next(iter(TABLE))] if h.startswith(port.column))
    try:
        installed = importlib.metadata.version(port.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{port.distribution} is not installed")
    assert f"({installed}" in header, f"the page says {header!r}, {installed} is installed"


# ------------------------------------------------------------------ defaults

def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


@pytest.mark.parametrize("port", ports(*ALL, "heavyball"))
def test_defaults(port: Port):
    cell = claim("defaults", port.column)
    if cell == "same":
        cell = claim("defaults", "adoptim")
    sig = inspect.signature(port.load())
    got = [sig.parameters["lr"].default, *sig.parameters["betas"].default, sig.parameters["eps"].default]
    assert got == pytest.approx(_numbers(cell), rel=1e-12), f"{port.column}: the page says {cell!r}"


# ------------------------------------------------------------------ clip bound

def clip_bounds(make_opt: Callable, updates: int = 3) -> list[float]:
    """The clip bound of each real update, read from the parameter (first call: g = 1; then g = 1e6)."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = make_opt([p])
    bounds, last = [], 0.0
    for t in range(updates + 1):
        p.grad = torch.full_like(p, 1.0 if t == 0 else 1e6)
        opt.step()
        if t:
            bounds.append((last - p.item()) / LR)
        last = p.item()
    return bounds


def bounds_claimed(cell: str, updates: int = 3) -> list[float]:
    """The bounds of updates 1..updates by the page's formula: ``t^c`` or ``(t+1)^c``."""
    m = re.match(r"(\(t\+1\)|t)\^(\d+(?:\.\d+)?)", cell)
    assert m, f"no bound formula at the start of {cell!r}"
    offset, c = (1 if m.group(1) == "(t+1)" else 0), float(m.group(2))
    return [(t + offset) ** c for t in range(1, updates + 1)]


@pytest.mark.parametrize("port", ports(*ALL))
def test_clip_bound(port: Port):
    cell = claim("clip bound", port.column)
    cls = port.load()
    for foreach in (False, True):
        got = clip_bounds(lambda ps, f=foreach: cls(ps, lr=LR, betas=(0.0, 0.9999), foreach=f))
        # rel 1e-6: torch-adopt's foreach path computes the bound from a float32 step
        assert got == pytest.approx(bounds_claimed(cell), rel=1e-6), f"{port.column}, foreach={foreach}: {cell!r}"
    first = re.search(r"(\d+)\^(\d+(?:\.\d+)?) ≈ (\d+\.\d+) at the first update", cell)
    if first:  # the worked number beside the formula
        assert float(first.group(1)) ** float(first.group(2)) == pytest.approx(float(first.group(3)), abs=5e-3)
        assert got[0] == pytest.approx(float(first.group(1)) ** float(first.group(2)), rel=1e-6)


@pytest.mark.timm
def test_timm_clip_exp_025_is_adoptims_rule():
    Adopt = _timm()
    got = clip_bounds(lambda ps: Adopt(ps, lr=LR, betas=(0.0, 0.9999), clip_exp=0.25))
    assert got == pytest.approx(bounds_claimed(claim("clip bound", "adoptim")), rel=1e-12)


# ------------------------------------------------------------------ a parameter that starts late

def initialises_late_parameter(make_opt: Callable) -> bool:
    """Whether a parameter whose first gradient comes at call 4 does its own first call (does not move)."""
    early = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    late = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = make_opt([early, late])
    for call in range(4):
        early.grad = torch.ones_like(early)
        late.grad = torch.ones_like(late) if call == 3 else None
        opt.step()
    return bool(torch.equal(late.detach(), torch.zeros_like(late)))


def _yes(text: str) -> bool:
    text = text.strip().lower()
    assert text.startswith(("yes", "no")), f"expected yes or no, got {text!r}"
    return text.startswith("yes")


def _per_kernel(cell: str) -> dict[bool, bool]:
    """{foreach: claim} from ``yes`` or ``for-loop: yes; foreach: no``."""
    if "for-loop:" in cell:
        parts = dict(part.split(":", 1) for part in cell.split(";"))
        return {False: _yes(parts["for-loop"]), True: _yes(parts[" foreach"])}
    return {False: _yes(cell), True: _yes(cell)}


@pytest.mark.parametrize("port", ports(*ALL))
def test_late_parameter(port: Port):
    cell = claim("a parameter whose gradient starts late", port.column)
    cls = port.load()
    for foreach, claimed in _per_kernel(cell).items():
        got = initialises_late_parameter(lambda ps, f=foreach: cls(ps, lr=LR, foreach=f))
        assert got == claimed, f"{port.column}, foreach={foreach}: the page says {cell!r}"
    if port.column == "adoptim":
        assert "every kernel" in cell
        assert initialises_late_parameter(lambda ps: ADOPT(ps, lr=LR, fused=True))


# ------------------------------------------------------------------ the first call and p.grad

@pytest.mark.parametrize("port", ports(*ALL))
def test_decoupled_decay_on_the_first_call(port: Port):
    claimed = _yes(claim("decoupled decay on the first", port.column))
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = port.load()([p], lr=LR, weight_decay=0.1, foreach=False, **{port.decoupled: True})
    p.grad = torch.ones_like(p)
    opt.step()  # the first call: ADOPT only sets v
    decayed = not torch.equal(p.detach(), torch.ones_like(p))
    assert decayed == claimed
    if decayed:
        assert torch.equal(p.detach(), torch.full_like(p, 1 - LR * 0.1))


@pytest.mark.parametrize("port", ports(*ALL))
def test_step_changes_the_callers_grad(port: Port):
    cell = claim("`step()` changes", port.column)
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = port.load()([q], lr=LR, weight_decay=0.1, foreach=False)  # coupled decay
    changed = False
    for _ in range(2):
        q.grad = torch.full_like(q, 2.0)
        opt.step()
        changed |= not torch.equal(q.grad, torch.full_like(q, 2.0))
    assert changed == _yes(cell)
    if "coupled decay is added" in cell:
        q.grad = torch.full_like(q, 2.0)
        before = q.detach().clone()
        opt.step()
        assert torch.equal(q.grad, 2.0 + 0.1 * before)


# ------------------------------------------------------------------ fused, checkpoint keys

@pytest.mark.parametrize("port", ports(*ALL))
def test_fused_step(port: Port):
    cell = claim("fused step", port.column)
    cls = port.load()
    p = torch.nn.Parameter(torch.zeros(2))
    if cell == "no":
        assert "fused" not in inspect.signature(cls).parameters
        return
    assert cell.startswith("`fused=True`"), cell
    if "raises" in cell:
        with pytest.raises(RuntimeError):
            opt = cls([p], fused=True)
            p.grad = torch.ones_like(p)
            opt.step()
    else:
        assert "C on CPU" in cell
        opt = cls([p], lr=LR, fused=True)
        for _ in range(2):
            p.grad = torch.ones_like(p)
            opt.step()
        assert not torch.equal(p.detach(), torch.zeros_like(p))


@pytest.mark.parametrize("port", ports(*ALL))
def test_checkpoint_group_keys(port: Port):
    keys = re.findall(r"`([a-z_]+)`", claim("checkpoint group keys", port.column))
    assert keys
    p = torch.nn.Parameter(torch.zeros(2))
    opt = port.load()([p], lr=LR)
    p.grad = torch.ones_like(p)
    opt.step()
    group = opt.state_dict()["param_groups"][0]
    assert set(keys) <= set(group), f"{port.column}: {keys} not all in {sorted(group)}"
    others = {"decoupled_weight_decay", "clip_exponent", "decouple", "decoupled", "clip_exp", "weight_decouple"}
    assert not (others - set(keys)) & set(group), f"{port.column} saves more of these keys than the page says"


# ------------------------------------------------------------------ pytorch_optimizer's converter

def test_pytorch_optimizer_state_converts_and_loads():
    po = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(3))]
    old = po.ADOPT(params, lr=LR, weight_decay=0.01, weight_decouple=True, foreach=False)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        old.step()
    saved = old.state_dict()
    with pytest.raises(ValueError, match=r"lacks \['step'\] .*pytorch_optimizer\.convert_state_dict"):
        ADOPT(params).load_state_dict(saved)  # its state has no per-parameter step
    new = ADOPT(params)
    new.load_state_dict(convert_state_dict(saved))
    group = new.param_groups[0]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.01 and group["lr"] == LR
    for p in params:
        assert float(new.state[p]["step"]) == 3
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])


def test_convert_refuses_what_adoptim_does_not_implement():
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.nn.Parameter(torch.ones(2))
    sd = po.ADOPT([p], fixed_decay=True).state_dict()
    sd["param_groups"][0].setdefault("step", 0)
    with pytest.raises(ValueError, match="fixed_decay=True"):
        convert_state_dict(sd)
    with pytest.raises(ValueError, match="not a pytorch_optimizer"):
        convert_state_dict(ADOPT([p]).state_dict())


def test_pytorch_optimizer_state_saved_before_its_first_step_converts():
    po = pytest.importorskip("pytorch_optimizer")
    p = torch.nn.Parameter(torch.ones(2))
    sd = convert_state_dict(po.ADOPT([p], lr=0.02, weight_decay=0.1, weight_decouple=True).state_dict())
    new = ADOPT([p], foreach=False)
    new.load_state_dict(sd)
    group = new.param_groups[0]
    assert sd["state"] == {} and group["lr"] == 0.02 and group["decoupled_weight_decay"] is True
    assert group["foreach"] is False  # its foreach=None did not replace the loading optimizer's kernel choice
