"""Seed statistics of sweeps: Student-t intervals against tabulated quantiles, and ranking with ties."""
from __future__ import annotations

import math
import statistics

import pytest

from fewstep.sweep.stats import Rank, rank, student_t_two_sided, summarize, t_quantile


@pytest.mark.parametrize("df,quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                          (30, 2.0423)])
def test_t_quantiles_match_the_tables(df, quantile):
    assert t_quantile(0.95, df) == pytest.approx(quantile, abs=5e-4)


def test_t_distribution_closed_form_limits():
    assert student_t_two_sided(0.0, 5) == 0.0
    assert student_t_two_sided(1.0, 1) == pytest.approx(0.5)                    # Cauchy: P(|T| ≤ 1) = ½
    assert student_t_two_sided(1.96, 10_000) == pytest.approx(0.95, abs=1e-3)   # → the normal


def test_summary_mean_std_and_interval():
    s = summarize([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(statistics.stdev([1, 2, 4]))
    half = t_quantile(0.95, 2) * s.std / math.sqrt(3)
    assert (s.low, s.high) == pytest.approx((7 / 3 - half, 7 / 3 + half)) and s.n == 3
    one = summarize([5.0, float("nan")])
    assert one.n == 1 and one.std is None and one.low is None
    assert summarize([]) is None


def test_overlapping_intervals_are_a_tie_and_separated_ones_are_ranked():
    a = summarize([10.0, 10.2, 9.8])          # ≈ 10 ± 0.5
    b = summarize([10.1, 10.4, 9.9])          # overlaps a
    c = summarize([20.0, 20.5, 19.5])         # far worse
    d = summarize([30.0])                     # one seed: no interval, unranked
    ranks = rank({"a": a, "b": b, "c": c, "d": d})
    assert ranks == {"a": Rank(1, True), "b": Rank(1, True), "c": Rank(3, False), "d": Rank(None)}
    assert [str(ranks[k]) for k in "abcd"] == ["1=", "1=", "3", "–"]
    chain = rank({"x": summarize([1.0, 1.1, 0.9]), "y": summarize([1.5, 2.5, 2.0]), "z": summarize([2.9, 3.0, 3.1])})
    # x ≈ [0.75, 1.25], y ≈ [0.76, 3.24], z ≈ [2.75, 3.25]: x beats z; y overlaps both, so x and y tie for 1
    assert chain == {"x": Rank(1, True), "y": Rank(1, True), "z": Rank(2, False)}
