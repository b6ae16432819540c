"""The summary statistics: mean and 95% t-interval over seeds, against published t quantiles."""

from __future__ import annotations

import math
import statistics

import pytest

from adoptim_repro.report import markdown, mean_ci95, stats, t975

# Two-sided 95% quantiles of Student's t from published tables (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.2).
PUBLISHED = {1: 12.706, 2: 4.303, 5: 2.571, 10: 2.228, 30: 2.042, 40: 2.021, 60: 2.000, 100: 1.984, 120: 1.980}


@pytest.mark.parametrize("df", sorted(PUBLISHED))
def test_t_quantile_matches_published_tables(df: int) -> None:
    assert abs(t975(df) - PUBLISHED[df]) < 6e-4


def test_t_quantile_tends_to_the_normal_and_refuses_zero_df() -> None:
    assert abs(t975(10**6) - 1.959964) < 1e-5
    assert all(t975(d) > t975(d + 1) for d in range(1, 200))  # decreasing, no jump at the table's end
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        t975(0)


def test_mean_ci95_of_three_seeds_by_hand() -> None:
    values = [94.6, 94.8, 94.7]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(94.7)
    assert half == pytest.approx(4.303 * statistics.stdev(values) / math.sqrt(3))
    assert mean_ci95([5.0]) == (5.0, None)  # one seed: the interval is undefined, not zero
    # 41 seeds: the t quantile for 40 degrees of freedom, not the normal's 1.96.
    many = [float(i % 7) for i in range(41)]
    assert mean_ci95(many)[1] == pytest.approx(2.021 * statistics.stdev(many) / math.sqrt(41), rel=2e-4)


def test_stats_of_one_seed_leave_the_spread_undefined_and_tables_say_n_a() -> None:
    s = stats([0.9])
    assert (s.n, s.mean, s.ci95, s.std, s.min, s.max) == (1, 0.9, None, None, 0.9, 0.9)
    table = markdown("t", [{"optimizer": "adam", "acc": 90.0, "ci95": s.ci95}])
    assert "| adam | 90 | n/a |" in table and "| 0 |" not in table
    two = stats([1.0, 3.0])  # closed form: mean 2, sd sqrt(2), half-width t(1) * sd / sqrt(2) = 12.706
    assert (two.mean, two.std, two.min, two.max) == (2.0, pytest.approx(math.sqrt(2)), 1.0, 3.0)
    assert two.ci95 == pytest.approx(12.706)


def test_summaries_print_accuracy_in_percent_and_no_zero_interval_for_one_seed() -> None:
    from adoptim_repro import cifar10, mnist, rl, toy
    from adoptim_repro.config import resolve

    (row,) = mnist.summarize(None, [{"optimizer": "adam", "seed": 0, "test_accuracy": 0.947, "train_loss_final": 0.2}])
    assert row["test_accuracy_%"] == pytest.approx(94.7) and row["ci95"] is None
    (row,) = cifar10.summarize(None, [{"optimizer": "adam", "seed": 0, "test_acc": 0.5, "dataset": "d", "width": 1,
                                       "epochs": 1, "train_images": 10}])
    assert row["test_acc_%"] == 50.0 and row["ci95"] is None and row["std"] is None
    (row,) = rl.summarize(resolve(rl.RlConfig, validate=False),
                          [{"env": "HalfCheetah-v5", "optimizer": "adam", "seed": 0, "eval_return": -3.0,
                            "steps": 10}])
    assert row["ci95"] is None and row["std"] is None
    cfg = resolve(toy.ToyConfig, [("runs", 7), ("seeds", 2)])
    rows = toy.summarize(cfg, [{"optimizer": "adam", "seed": s, "k": 10, "beta2": 0.5, "median": 1.0, "q25": 1.0,
                                "q75": 1.0, "at_optimum": 0.25 * s, "median_hit_step": None if s else 5}
                               for s in (0, 1)])
    (row,) = rows
    assert row["runs"] == 14 and "seeds" not in row  # 7 runs in each of 2 seeds
    assert row["at_optimum_%"] == pytest.approx(12.5) and row["median_hit_step"] == "never"
    assert "None" not in markdown("toy", rows)


def _paired_expectation(diffs: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width of paired differences, written out: t(0.975, n-1) * sd / sqrt(n). The
    summaries' t table has three decimals (4.303 for 2 degrees of freedom), so half-widths agree to 2e-4."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = {2: 4.302653, 3: 3.182446}[n - 1]
    return mean, t * sd / math.sqrt(n)


def test_gpt_and_llama_summaries_pair_adopt_with_each_other_optimizer_by_seed() -> None:
    from adoptim_repro import gpt, llama

    val = {("adamw", 2): [2.50, 2.44, 2.47], ("adoptw", 2): [2.49, 2.45, 2.43],
           ("adamw", 16): [1.90, 1.88, 1.89], ("adoptw", 16): [1.77, 1.78, 1.74]}
    records = [{"batch": b, "optimizer": o, "seed": s, "final_train_loss": v[s] + 0.1, "val_loss": v[s], "spikes": s}
               for (o, b), v in val.items() for s in range(3)]
    rows = {(r["batch"], r["optimizer"]): r for r in gpt.summarize(None, records)}
    for b in (2, 16):
        mean, half = _paired_expectation([x - y for x, y in zip(val[("adoptw", b)], val[("adamw", b)])])
        row = rows[(b, "adamw")]
        assert row["adoptw-x val_loss"] == pytest.approx(mean)
        assert row["adoptw-x val_loss ci95"] == pytest.approx(half, rel=2e-4)
        assert row["adoptw-x val_loss excludes 0"] == ("yes" if abs(mean) > half else "no")
        assert rows[(b, "adoptw")]["adoptw-x val_loss"] is None and rows[(b, "adamw")]["spikes"] == 3
    assert rows[(16, "adamw")]["adoptw-x val_loss excludes 0"] == "yes"  # -0.127 +- 0.04: the batches apart

    held = {"adamw": [1.60, 1.54, 1.58, 1.57], "adopt": [1.59, 1.53, 1.57, 1.555]}
    records = [{"stage": "pretrain", "optimizer": "adamw", "seed": s, "final_train_loss": 1.9} for s in range(4)]
    records += [{"stage": "finetune", "optimizer": o, "seed": s, "final_train_loss": 1.5, "heldout_loss": v[s]}
                for o, v in held.items() for s in range(4)]
    rows = {(r["stage"], r["optimizer"]): r for r in llama.summarize(None, records)}
    mean, half = _paired_expectation([x - y for x, y in zip(held["adopt"], held["adamw"])])
    row = rows[("finetune", "adamw")]
    assert row["adopt-x heldout_loss"] == pytest.approx(mean)
    assert row["adopt-x heldout_loss ci95"] == pytest.approx(half, rel=2e-4)
    assert row["adopt-x heldout_loss excludes 0"] == "yes" and "adopt-x heldout_loss" not in rows[("pretrain", "adamw")]
