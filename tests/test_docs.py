"""The documentation: generated tables match their results, links resolve, every page and figure is used.

The site itself is built with warnings as errors by ``scripts/test.sh`` (``mkdocs build --strict``,
which also checks links and anchors between pages); these tests cover what that build does not see:
the performance page against ``benchmarks/results/*.json``, the README (outside the site), the
navigation, the figures and the citation file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from optim_helpers import load_script

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


render_docs = load_script(ROOT / "benchmarks" / "render_docs.py", "render_docs")


# ------------------------------------------------------------------ the performance page

def test_performance_page_is_rendered_from_the_results():
    page = render_docs.PAGE.read_text()
    rendered = render_docs.render(page, render_docs.load_results())
    assert rendered == page, "docs/performance.md differs from its results: run python benchmarks/render_docs.py"


def test_low_precision_speed_table_is_rendered_from_its_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/low_precision.md's speed tables are what benchmarks/low_precision_speed.py --render writes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its neighbours
    module = load_script(ROOT / "benchmarks" / "low_precision_speed.py", "low_precision_speed")
    doc = json.loads((ROOT / "benchmarks" / "results" / "low_precision_speed" / "cpu.json").read_text())
    assert doc["benchmark"] == "low_precision_speed"
    page = (DOCS / "low_precision.md").read_text()
    start, end = f"<!-- results: {module.BLOCK} -->\n", f"<!-- /results: {module.BLOCK} -->"
    assert page.split(start, 1)[1].split(end, 1)[0] == module.render(doc), (
        "docs/low_precision.md's speed block differs from its results: run python benchmarks/low_precision_speed.py "
        "--render benchmarks/results/low_precision_speed/cpu.json --page docs/low_precision.md")


def test_every_results_file_is_a_benchmarks_output():
    results = render_docs.load_results()
    assert results, "benchmarks/results/ holds no results"
    for name, doc in results.items():
        assert doc["benchmark"] in render_docs.RENDERERS, name
        for key in ("command", "date", "machine", "torch", "adoptim", "commit", "settings", "results"):
            assert key in doc, f"{name}.json lacks {key!r}"
        assert doc["command"].startswith(f"python benchmarks/{doc['benchmark']}.py"), doc["command"]
        assert re.fullmatch(r"[0-9a-f]{40}", doc["commit"] or ""), f"{name}.json: commit {doc['commit']!r}"
        for key in ("cpu", "logical_cpus", "torch_threads"):
            assert doc["machine"].get(key), f"{name}.json: machine lacks {key!r}"


def _hand_edited(page: str) -> str:
    """``page`` with every digit of its first table's rows made a 9, as a hand edit of the numbers would."""
    block = next(render_docs.BLOCK.finditer(page))
    body_start = page.index("\n", block.start()) + 1
    body_end = page.rindex("\n", block.start(), block.end())
    body = re.sub(r"^(\|.*)$", lambda m: re.sub(r"\d", "9", m.group(1)), page[body_start:body_end], flags=re.M)
    edited = page[:body_start] + body + page[body_end:]
    assert edited != page
    return edited


def test_a_hand_edited_table_is_rewritten():
    page = render_docs.PAGE.read_text()
    results = render_docs.load_results()
    edited = _hand_edited(page)
    assert render_docs.render(edited, results) == page  # the block comes back from the results
    outside = page + "\nA hand-written sentence after the tables.\n"
    assert render_docs.render(outside, results) == outside  # text outside the blocks is kept


def test_blocks_and_results_files_must_match():
    page = render_docs.PAGE.read_text()
    results = render_docs.load_results()
    name = next(iter(results))
    with pytest.raises(ValueError, match="without a block"):
        render_docs.render(render_docs.BLOCK.sub("", page), results)
    with pytest.raises(ValueError, match="without a results file"):
        render_docs.render(page, {k: v for k, v in results.items() if k != name})


def test_check_mode_reports_a_stale_page(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(_hand_edited(render_docs.PAGE.read_text()))
    assert render_docs.main(["--check", "--page", str(page)]) == 1
    assert render_docs.main(["--page", str(page)]) == 0
    assert render_docs.main(["--check", "--page", str(page)]) == 0
    assert page.read_text() == render_docs.PAGE.read_text()


# ------------------------------------------------------------------ links, pages, figures

def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not inside code blocks
    return re.findall(r"\]\(([^)\s]+)\)", text)


def _local_targets(path: Path) -> list[tuple[str, Path]]:
    out = []
    for link in _links(path):
        if re.match(r"[a-z]+:", link) or link.startswith("#"):
            continue
        out.append((link, (path.parent / link.split("#")[0]).resolve()))
    return out


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    text = README.read_text()
    assert "<this repository>" not in text
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


@pytest.mark.parametrize("path", [README, ROOT / "CHANGELOG.md"], ids=lambda p: p.name)
def test_relative_links_outside_the_site_resolve(path: Path):
    targets = _local_targets(path)
    assert targets or path.name != "README.md"
    for link, target in targets:
        assert target.exists(), f"{path.name}: {link} -> {target} does not exist"


def _nav_pages(nav: list) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_navigation():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                   if not any(part.startswith("_") for part in p.relative_to(DOCS).parts))
    assert sorted(nav) == pages


def test_every_figure_is_shown_and_names_its_command():
    shown = {}
    for page in DOCS.rglob("*.md"):
        for _link, target in _local_targets(page):
            if target.suffix == ".png":
                shown[target.name] = page
    figures = sorted(p.name for p in (DOCS / "figures").glob("*.png"))
    assert figures and sorted(shown) == figures, "every figure in docs/figures/ is shown on a page, and only those"
    for name, page in shown.items():
        assert re.search(rf"`{re.escape(name)}` from the output folder of `adoptim \w+", page.read_text()), (
            f"{page.name} shows {name} without naming the command that writes it")


def test_the_api_reference_documents_the_public_modules_only():
    blocks = re.findall(r"^::: (\S+)", (DOCS / "api.md").read_text(), flags=re.M)
    assert set(blocks) >= {"adoptim.ADOPT", "adoptim.ADOPTW", "adoptim.adopt", "adoptim.reference",
                           "adoptim.migration", "adoptim.integrations.timm", "adoptim.integrations.pytorch_optimizer"}
    assert not [b for b in blocks if b.startswith("adoptim.kernels")]


# ------------------------------------------------------------------ license and citation

def test_license_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_citation_file():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "type", "version", "license"):
        assert cff.get(key), key
    assert cff["license"] == "Apache-2.0"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert str(cff["version"]) == version
    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2024
    assert paper["title"].startswith("ADOPT: Modified Adam Can Converge with Any")
    assert [a["family-names"] for a in paper["authors"]] == [
        "Taniguchi", "Harada", "Minegishi", "Oshima", "Jeong", "Nagahara", "Iiyama", "Suzuki", "Iwasawa", "Matsuo"]
    assert {"type": "doi", "value": "10.48550/arXiv.2411.02853"}.items() <= paper["identifiers"][0].items()
    json.dumps(cff)  # plain data, as the format requires


# ------------------------------------------------------------------ the docstrings' markup

def test_docstring_markup_becomes_markdown():
    pytest.importorskip("griffe")
    module = load_script(DOCS / "_ext" / "rst_markup.py", "rst_markup")
    text = """For any :math:`\\\\beta_2`, see :class:`~adoptim.ADOPT` and :func:`adoptim.adopt`.

.. math::
    a \\\\leftarrow b

=====  =====
key    value
=====  =====
a      1
=====  =====

The box::

    p = p - lr*m

Example::

    >>> 1 + 1
    2
"""
    assert module.rst_to_markdown(text).splitlines() == [
        "For any $\\\\beta_2$, see `ADOPT` and `adoptim.adopt`.", "", "$$", "a \\\\leftarrow b", "$$", "",
        "| key | value |", "| --- | --- |", "| a | 1 |", "", "The box:", "", "```text", "p = p - lr*m", "```", "",
        "Examples:", "    >>> 1 + 1", "    2"]
