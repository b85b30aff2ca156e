"""Seed statistics of a sweep: mean, standard deviation and a 95 % confidence interval per member, and a
ranking that only claims what the intervals support.

The interval is Student's t interval of the mean over the training seeds,
mean ± t_{0.975, n−1}·s/√n (s the sample standard deviation, divisor n − 1). With one seed there is no
interval, and no ranking.

Ranking (lower is better, as for every Fréchet distance and sliced Wasserstein): member A is *better*
than member B when A's interval lies entirely below B's (upper(A) < lower(B)). A member's rank is 1 + the
number of members better than it, so members whose intervals overlap share a rank: a tie.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CONFIDENCE = 0.95


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` ≥ 1 degrees of freedom (closed form for integer df,
    Abramowitz & Stegun 26.7.3–4: a finite series in θ = atan(t/√df))."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be ≥ 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        if df > 1:
            total = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """t such that P(|T| ≤ t) = ``confidence`` (e.g. 12.706 for 95 % at df = 1, 4.303 at df = 2), by bisection."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while student_t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if student_t_two_sided(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """Statistics of one member's values over seeds.

    Attributes:
        values: the per-seed values (finite ones).
        mean: their mean.
        std: sample standard deviation (n − 1), ``None`` for one value.
        low, high: the 95 % confidence interval of the mean, ``None`` for one value.
    """

    values: tuple[float, ...]
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary | None:
    """Mean, std and t interval of the finite ``values`` (``None`` when there are none)."""
    vals = tuple(float(v) for v in values if v is not None and math.isfinite(v))
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return Summary(vals, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Summary(vals, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Rank:
    """A member's place: ``rank`` (1 = best), ``tied`` (another member shares it) or ``None`` when no
    ranking is possible (fewer than two seeds, or no value)."""

    rank: int | None
    tied: bool = False

    def __str__(self) -> str:
        if self.rank is None:
            return "–"
        return f"{self.rank}=" if self.tied else str(self.rank)


def rank(summaries: dict[str, Summary | None]) -> dict[str, Rank]:
    """Ranks of members by their intervals (lower is better); see the module docstring."""
    usable = {k: s for k, s in summaries.items() if s is not None and s.low is not None}
    out = {k: Rank(None) for k in summaries}
    ranks = {k: 1 + sum(o.high < s.low for o in usable.values()) for k, s in usable.items()}
    for k, r in ranks.items():
        out[k] = Rank(r, tied=list(ranks.values()).count(r) > 1)
    return out


__all__ = ["CONFIDENCE", "Rank", "Summary", "rank", "student_t_two_sided", "summarize", "t_quantile"]
