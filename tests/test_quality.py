"""Inception Score and precision/recall against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.metrics.quality import inception_score, knn_radii, precision_recall


def test_inception_score_closed_forms():
    eye = torch.eye(8).repeat(10, 1)                     # confident and uniform over 8 classes: IS = 8
    assert inception_score(eye, splits=10) == pytest.approx((8.0, 0.0), abs=1e-9)
    flat = torch.full((40, 5), 0.2)                       # no information: IS = 1
    assert inception_score(flat, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]).repeat(5, 1)
    assert inception_score(half, splits=5)[0] == pytest.approx(2.0)   # KL = log 2 per image
    with pytest.raises(ValueError, match="N ≥ splits"):
        inception_score(torch.ones(3, 2) / 2, splits=10)


def test_knn_radii_on_a_line():
    x = torch.arange(10, dtype=torch.float64)[:, None]
    assert knn_radii(x, 3).tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]


def test_precision_recall_of_mode_dropping_on_gaussians():
    """Real data: two far-apart Gaussian modes A and B. Generated: copies of A's points (inside the real
    manifold) and a third far-away mode C. Each copy lies at distance 0 from a real point and C is beyond
    every radius, so precision = |A| / (|A| + |C|) and recall = |A| / (|A| + |B|) exactly."""
    g = torch.Generator().manual_seed(0)
    d = 16
    a = torch.randn(300, d, generator=g, dtype=torch.float64)
    b = torch.randn(100, d, generator=g, dtype=torch.float64) + 1000
    c = torch.randn(200, d, generator=g, dtype=torch.float64) - 1000
    real, fake = torch.cat([a, b]), torch.cat([a.clone(), c])
    assert precision_recall(real, fake) == pytest.approx((300 / 500, 300 / 400))
    assert precision_recall(real, real) == (1.0, 1.0)
    same = torch.randn(2000, 2, generator=g, dtype=torch.float64)       # a fresh sample of the same law:
    p, r = precision_recall(same[:1000], same[1000:])                     # both high, neither exactly 1
    assert 0.8 < p < 1 and 0.8 < r < 1
    shrunk = precision_recall(same[:1000], 0.3 * same[1000:])            # mode collapse towards the mean:
    assert shrunk[0] > 0.97 and shrunk[1] < 0.6                           # precise, low recall
    with pytest.raises(ValueError, match="same|features"):
        precision_recall(a, torch.zeros(5, 3))
    assert math.isfinite(p)
