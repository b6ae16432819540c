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
