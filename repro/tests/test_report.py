"""The summary statistics: mean and 95% t-interval over seeds, against published t quantiles."""

from __future__ import annotations

import math
import statistics

import pytest

from adoptim_repro.report import mean_ci95, t975

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
