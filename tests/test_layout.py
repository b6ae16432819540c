"""The two distributions: the library (``src/adoptim``, torch alone) and the reproduction suite (``repro/``).

The library never imports the suite, nor anything but the standard library, torch and its own modules
outside the optional integrations; ``pip install .`` at the root ships the library alone (no suite, no
console script); the suite's distribution depends on the library and carries the ``adoptim`` command.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11 and newer

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "adoptim"
# Imported only inside the integration that needs it, or lazily by the kernel that ships with CUDA torch.
OPTIONAL = {"triton", "timm", "transformers", "pytorch_optimizer", "lightning", "accelerate"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_only_torch_and_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "adoptim"} | OPTIONAL
    for path in sorted(LIBRARY.rglob("*.py")):
        extra = _imports(path) - allowed
        assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"
        assert "adoptim_repro" not in _imports(path)


def test_the_distributions_depend_the_right_way() -> None:
    library = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    suite = tomllib.loads((ROOT / "repro" / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in library["dependencies"]] == ["torch"]
    assert "scripts" not in library
    assert "adoptim" in suite["dependencies"] and suite["scripts"]["adoptim"] == "adoptim_repro.cli:main"


@pytest.mark.slow
def test_the_library_wheel_holds_the_library_alone(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("adoptim-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert {n.split("/")[0] for n in names} == {"adoptim", f"adoptim-{version}.dist-info"}
    assert "adoptim/py.typed" in names and any(n.startswith("adoptim/kernels/_adopt_cpu") for n in names)
    assert not any("entry_points" in n for n in names)
