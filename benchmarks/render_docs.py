"""Writes the measured tables of ``docs/performance.md`` from the benchmarks' results (``benchmarks/results/*.json``).

    python benchmarks/render_docs.py            # rewrite the page's tables from the results files
    python benchmarks/render_docs.py --check    # exit status 1 if the page is not what it would write

The page holds, for every results file ``NAME.json``, one block::

    <!-- results: NAME -->
    ... written here: where and when it was measured, then the tables ...
    <!-- /results: NAME -->

Everything outside the blocks is hand-written and kept as it is. A block whose file is missing, or a
results file that no block shows, is an error. The tables are computed from the raw numbers in the
files (each benchmark's docstring says what it saves) the way the benchmark prints them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "performance.md"
BLOCK = re.compile(r"<!-- results: (?P<name>[\w.-]+) -->\n.*?<!-- /results: (?P=name) -->", re.S)

Doc = dict[str, Any]


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else list(values) * 3
    return q[0], q[2]


def provenance(doc: Doc) -> str:
    """One line: what ran, when, on which machine, with which torch and commit."""
    m = doc["machine"]
    cores = f"{m['physical_cores']} cores, " if m.get("physical_cores") else ""
    dirty = " plus uncommitted changes" if doc.get("dirty") else ""
    gpu = f", {m['cuda_device']}" if m.get("cuda_device") else ""
    load = f", load average {m['load_average']:.1f} when written" if "load_average" in m else ""
    date = doc["date"].replace("T", " ").replace("Z", " UTC")
    return (f"`{doc['command']}`, {date}: {m['cpu']} ({cores}{m['logical_cpus']} logical CPUs{gpu}), "
            f"{m['torch_threads']} torch thread(s){load}, torch {doc['torch']}, adoptim {doc['adoptim']}, "
            f"commit `{(doc['commit'] or 'unknown')[:10]}`{dirty}.")


# ------------------------------------------------------------------ one renderer per benchmark

def step_time(doc: Doc) -> list[str]:
    out: list[str] = []
    for key, store in doc["results"].items():
        layout = store["layout"]
        nbytes = 7 * layout["numel"] * layout["element_size"]
        gbps = lambda ms, n=nbytes: n / (ms / 1e3) / 1e9
        name, device, dtype, threads = key.split("/")[-4:]
        if key.startswith("head-to-head/"):
            times = store["times_ms"]
            out += [f"**({name}) {layout['title']}**: {layout['numel'] / 1e6:.1f}M parameters, {dtype}, {device}, "
                    f"{threads} thread(s), {store['rounds']} rounds taking turns", ""]
            rows = []
            contenders = [w for w in times if w != "bound"]
            for what in ["bound", *contenders]:
                med = statistics.median(times[what])
                rows.append([what, f"{med:.1f}", f"{min(times[what]):.1f}", f"{gbps(med):.1f}"])
            out += _table(["what", "median ms", "min ms", "GB/s"], "lrrr", rows)
            out.append("")
            for what in [w for w in contenders if w.startswith("adoptim")]:
                ratios = [a / b for a, b in zip(times[what], times["torch AdamW fused"], strict=True)]
                of_bound = [a / b for a, b in zip(times[what], times["bound"], strict=True)]
                lo, hi = _quartiles(ratios)
                out += [f"- {what} / AdamW fused, per round: median {statistics.median(ratios):.3f} (quartiles "
                        f"{lo:.3f} to {hi:.3f}); {what} / bound: median {statistics.median(of_bound):.2f}."]
            out.append("")
            continue
        rows_ = {k: v for k, v in store.items() if k not in ("layout", "bound", "alloc")}
        steps = doc["settings"].get("steps")
        out += [f"**({name}) {layout['title']}**: {layout['numel'] / 1e6:.1f}M parameters, {dtype}, {device}, "
                f"{threads} thread(s), median of {steps} steps", ""]
        bound = store["bound"]
        bound_gbps = gbps(statistics.median(bound["samples_ms"]))
        ref = rows_.get("torch AdamW fused", {}).get("median_ms")
        rows = [["bound (STREAM-like, same traffic)", f"{statistics.median(bound['samples_ms']):.1f}",
                 f"{min(bound['samples_ms']):.1f}", "", f"{bound_gbps:.1f}", "1.00", ""]]
        for what, row in rows_.items():
            if "error" in row:
                rows.append([what, f"failed: {row['error']}", "", "", "", "", ""])
                continue
            g = gbps(row["median_ms"])
            rows.append([what, f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}", f"{row['first_ms']:.1f}", f"{g:.1f}",
                         f"{g / bound_gbps:.2f}", f"{row['median_ms'] / ref:.2f}" if ref else "n/a"])
        out += _table(["optimizer", "median ms", "min ms", "first-step ms", "GB/s", "of bound", "vs AdamW fused"],
                      "lrrrrrr", rows)
        alloc = store["alloc"]["samples_ms"]
        spreads = [(r["max_ms"] - r["min_ms"]) / r["median_ms"] for r in rows_.values() if "min_ms" in r]
        out += ["", f"Allocating the state alone (two zero tensors per parameter): median "
                f"{statistics.median(alloc):.1f} ms, {min(alloc):.1f} to {max(alloc):.1f} ms. (max - min) / median "
                f"over the timed steps: median {statistics.median(spreads):.0%}, worst {max(spreads):.0%}.", ""]
    return out


def host_overhead(doc: Doc) -> list[str]:
    out: list[str] = []
    for table in doc["results"]:
        n = table["tensors"]
        rows = [[r["what"].replace("  ", "&nbsp;&nbsp;", 1) if r["what"].startswith("  ") else r["what"],
                 *(["not available", ""] if r["median_us"] is None else
                   [f"{r['median_us']:.0f}", f"{r['median_us'] / n:.2f}"])] for r in table["rows"]]
        out += [f"**{n} tensors** of 4 elements, median of {doc['settings']['repeats']} calls", ""]
        out += _table(["what", "median µs", "µs per tensor"], "lrr", rows) + [""]
    return out


def first_step(doc: Doc) -> list[str]:
    rows, parts_lines = [], []
    for table in doc["results"]:
        for name, run in table["optimizers"].items():
            lo, hi = _quartiles(sorted(f / s for f, s in zip(run["first_ms"], run["steady_ms"], strict=True)))
            ratio = statistics.median(f / s for f, s in zip(run["first_ms"], run["steady_ms"], strict=True))
            rows.append([f"({table['layout']})", name, f"{statistics.median(run['first_ms']):.1f}",
                         f"{statistics.median(run['steady_ms']):.1f}", f"{ratio:.2f} ({lo:.2f} to {hi:.2f})"])
        parts = ", ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in table["parts_ms"].items())
        parts_lines.append(f"({table['layout']}) {table['title']}, {table['rounds']} rounds: {parts}")
    out = _table(["layout", "optimizer", "first step ms", "steady step ms", "first / steady, per round (quartiles)"],
                 "llrrl", rows)
    return out + ["", "adoptim's first step, medians over the rounds:", ""] + [f"- {x}" for x in parts_lines] + [""]


def element_cost(doc: Doc) -> list[str]:
    res = doc["results"]
    s = doc["settings"]
    rows = [[r["dtype"], f"{r['ns_per_element']:.2f}", f"{r['fixed_us']:.2f}"] for r in res["rows"]]
    head = f"ns per element (slope from {res['small']} to {s['elements']} elements, best of {s['repeats']})"
    return _table(["dtype", head, "fixed cost of a call, µs"], "lrr", rows) + [""]


def threads(doc: Doc) -> list[str]:
    res = doc["results"]
    out = [f"**{res['numel'] / 1e6:.0f}M {res['dtype']} parameters in {res['tensors']} tensors**, "
           f"{doc['machine']['torch_threads']} thread(s), {res['rounds']} rounds; OpenMP runtime: "
           f"{', '.join(res['openmp_runtimes']) or 'none found'}", ""]
    rows = [[r["situation"], r["threads"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['ratio']:.2f}"]
            for r in res["rows"]]
    return out + _table(["situation", "threads", "median ms", "min ms", "time / the package's, median per round"],
                        "llrrr", rows) + [""]


def cold_step_table(res: dict[str, Any]) -> list[str]:
    """``cold_step.py``'s table, its rows in the order measured, and the host budget of a step at twice the bound."""
    med = {name: statistics.median(t) for name, t in res["times_ms"].items()}
    n = res["tensors"]
    rows = [[name.replace("  ", "&nbsp;&nbsp;", 1) if name.startswith("  ") else name, f"{ms:.2f}",
             f"{ms * 1e3 / n:.2f}"] for name, ms in med.items()]
    budget = 2 * med["bound"] - med["  its C kernel call"]
    return _table(["what", "median ms", "µs per tensor"], "lrr", rows) + [
        "", f"A step at twice the bound leaves {budget:.2f} ms of host work ({budget * 1e3 / n:.2f} µs per "
        f"tensor) beside the kernel call; reading the gradients cold takes "
        f"{med['.grad of every parameter, cold']:.2f} ms of it."]


def cold_step(doc: Doc) -> list[str]:
    res, s = doc["results"], doc["settings"]
    head = (f"**{res['tensors']} tensors of {s['elements']} float32 elements**, {doc['machine']['torch_threads']} "
            f"thread(s), {res['rounds']} rounds taking turns, caches evicted ({s['evict_mb']} MB) before every "
            "timed call")
    return [head, "", *cold_step_table(res), ""]


RENDERERS: dict[str, Callable[[Doc], list[str]]] = {
    "step_time": step_time, "host_overhead": host_overhead, "first_step": first_step,
    "element_cost": element_cost, "threads": threads, "cold_step": cold_step,
}


# ------------------------------------------------------------------ the page

def block(name: str, doc: Doc) -> str:
    body = RENDERERS[doc["benchmark"]](doc)
    while body and not body[-1]:
        body.pop()
    return "\n".join([f"<!-- results: {name} -->", "", "Measured by " + provenance(doc), "", *body, "",
                      f"<!-- /results: {name} -->"])


def load_results(folder: Path = RESULTS) -> dict[str, Doc]:
    """Every results file in ``folder``, by name (the file name without ``.json``)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def render(page: str, results: dict[str, Doc]) -> str:
    """``page`` with every results block rewritten from ``results``; ValueError if they do not match."""
    shown = [m.group("name") for m in BLOCK.finditer(page)]
    missing = [n for n in shown if n not in results]
    unshown = [n for n in results if n not in shown]
    twice = sorted({n for n in shown if shown.count(n) > 1})
    if missing or unshown or twice:
        raise ValueError(f"results blocks and files differ: blocks without a results file {missing}, results files "
                         f"without a block {unshown}, blocks shown twice {twice}")
    return BLOCK.sub(lambda m: block(m.group("name"), results[m.group("name")]), page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page would change")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    page = args.page.read_text()
    new = render(page, load_results(args.results))
    if args.check:
        if new != page:
            print(f"{args.page} differs from its results: run python benchmarks/render_docs.py", file=sys.stderr)
            return 1
        return 0
    if new != page:
        args.page.write_text(new)
        print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
