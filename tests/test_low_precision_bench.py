"""``benchmarks/low_precision.py``: the Low-precision state page's tables are its rendering of the committed
runs, its paired intervals are the closed form, and a measurement resumes from its JSON, written atomically."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from optim_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "low_precision"
PAGE = ROOT / "docs" / "low_precision.md"


bench = load_script(ROOT / "benchmarks" / "low_precision.py", "low_precision_bench")


def _by_task() -> dict[tuple[str, int], list[Path]]:
    out: dict[tuple[str, int], list[Path]] = {}
    for path in sorted(RESULTS.glob("*.json")):
        meta = json.loads(path.read_text())["meta"]
        out.setdefault((meta.get("task", "mnist"), meta["steps"]), []).append(path)
    return out


def test_every_results_block_of_the_page_is_the_rendering_of_its_runs():
    page = PAGE.read_text()
    tasks = _by_task()
    assert {"mnist", "vae"} <= {task for task, _ in tasks}
    for (task, steps), paths in tasks.items():
        start, end = bench.block_marks(task, steps)
        assert start in page and end in page, f"the page has no block for {task}"
        shown = page.split(start, 1)[1].split(end, 1)[0]
        assert shown == bench.render(paths)[1], (
            f"the {task} table of {steps} steps differs from its runs: python benchmarks/low_precision.py --render "
            f"{' '.join(str(p.relative_to(ROOT)) for p in paths)} --page docs/low_precision.md")


def _runs(values: dict[str, list[float]]) -> dict:
    runs = [{"candidate": name, "seed": seed, "test_nelbo": x, "train_nelbo_final": 2 * x, "v_rel_err": 0.01}
            for name, xs in values.items() for seed, x in enumerate(xs)]
    return {"meta": {"task": "vae", "steps": 10, "seeds": 3, "seed0": 0, "candidates": list(values),
                     "torch": "x"}, "runs": runs}


def test_the_paired_difference_and_its_interval_are_the_closed_form(tmp_path):
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(_runs({"32-bit": [90.0, 95.0, 100.0], "8bit stochastic": [90.1, 95.2, 100.3]})))
    task, table = bench.render([path])
    row = next(line for line in table.splitlines() if line.startswith("| 8bit stochastic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Differences 0.1, 0.2, 0.3: mean 0.2, standard deviation 0.1, t(0.975, 2 dof) = 4.303.
    assert cells[3] == f"+0.200 ± {4.303 * 0.1 / math.sqrt(3):.3f}"
    assert cells[2] == f"95.200 ± {4.303 * statistics_stdev([90.1, 95.2, 100.3]) / math.sqrt(3):.3f}"
    assert cells[5] == f"+0.400 ± {4.303 * 0.2 / math.sqrt(3):.3f}"  # the train -ELBO is twice the test one
    assert task == "vae" and cells[1] == "2.03"


def test_the_interval_of_eight_seeds_takes_the_t_quantile_of_seven_degrees_of_freedom(tmp_path):
    base = [90.0 + 5 * k for k in range(8)]
    diffs = [0.1 * (k % 4) for k in range(8)]  # 0, .1, .2, .3 twice: mean 0.15
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(_runs({"32-bit": base, "8bit stochastic": [b + d for b, d in zip(base, diffs)]})))
    row = next(line for line in bench.render([path])[1].splitlines() if line.startswith("| 8bit stochastic"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # t(0.975, 7 dof) = 2.365 (Student's t table), not a larger-sample approximation.
    assert cells[3] == f"+0.150 ± {2.365 * statistics_stdev(diffs) / math.sqrt(8):.3f}"


def statistics_stdev(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _main(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["low_precision.py", *argv])
    bench.main()


def test_a_measurement_resumes_from_its_json_and_writes_it_atomically(tmp_path, monkeypatch):
    calls, first = [], {"process": True}

    def fake(task, name, steps, seed, batch=16):
        calls.append((name, seed))
        if first["process"] and len(calls) == 3:
            first["process"] = False
            raise RuntimeError("stopped")  # a run that dies in the middle of the measurement
        return {"test_nelbo": 90.0 + seed, "train_nelbo_final": 91.0, "v_rel_err": 0.0}

    monkeypatch.setattr(bench, "train_suite", fake)
    out = tmp_path / "vae.json"
    with pytest.raises(RuntimeError, match="stopped"):
        _main(monkeypatch, "--task", "vae", "--steps", "10", "--seeds", "2", "--json", str(out))
    saved = json.loads(out.read_text())
    assert [(r["candidate"], r["seed"]) for r in saved["runs"]] == [("32-bit", 0), ("bf16 stochastic", 0)]
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left beside it
    calls.clear()
    _main(monkeypatch, "--task", "vae", "--steps", "10", "--seeds", "2", "--json", str(out))
    assert calls == [("8bit stochastic", 0), ("32-bit", 1), ("bf16 stochastic", 1), ("8bit stochastic", 1)]
    assert len(json.loads(out.read_text())["runs"]) == 6


def test_a_failed_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "runs.json"
    bench.write_json(out, {"runs": [1]})
    with pytest.raises(TypeError):
        bench.write_json(out, {"runs": [object()]})
    assert json.loads(out.read_text()) == {"runs": [1]} and list(tmp_path.iterdir()) == [out]


def test_another_measurement_in_the_json_and_an_unknown_candidate_are_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "vae.json"
    out.write_text(json.dumps(_runs({"32-bit": [90.0]})))
    with pytest.raises(SystemExit, match="holds runs of another measurement \\(vae, 10 steps\\)"):
        _main(monkeypatch, "--task", "vae", "--steps", "20", "--json", str(out))
    with pytest.raises(SystemExit, match="unknown candidate '8bit nearest' for task vae; known: 32-bit, "):
        _main(monkeypatch, "--task", "vae", "--candidates", "8bit nearest")
    mixed = tmp_path / "mnist.json"
    mixed.write_text(json.dumps({**_runs({"32-bit": [1.0]}), "meta": {"steps": 10, "candidates": ["32-bit"]}}))
    with pytest.raises(SystemExit, match="different tasks"):
        bench.render([out, mixed])


@pytest.mark.parametrize("task", ["vae", "gpt"])
def test_a_suite_run_trains_the_experiment_and_follows_v(task):
    """A few real steps of the experiment: the metrics are finite, and 32-bit state's v is the float32 v the
    follower computes from the same gradients (to float32 rounding), where 8-bit codes are percents off."""
    full = bench.train_suite(task, "32-bit", 3, 0, 2)
    eight = bench.train_suite(task, "8bit stochastic", 3, 0, 2)
    for r in (full, eight):
        assert all(math.isfinite(x) for x in r.values()), r
    assert full["v_rel_err"] < 1e-5
    assert 1e-3 < eight["v_rel_err"] < 0.5


def test_runs_of_another_length_have_a_block_of_their_own():
    assert bench.block_marks("gpt") == bench.block_marks("gpt", 200) == (
        "<!-- results: low_precision gpt -->\n", "<!-- /results: low_precision gpt -->")
    assert bench.block_marks("gpt", 1000)[0] == "<!-- results: low_precision gpt 1000 steps -->\n"
    assert bench.block_marks("mnist", 1000)[0] == "<!-- results: low_precision -->\n"
