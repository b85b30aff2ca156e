"""Inception Score and improved precision/recall on the features an extractor gives.

**Inception Score** (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) ‖ p(y))), p(y) the mean of p(y|x) over
the set; computed on ``splits`` equal parts and reported as mean and standard deviation over the parts
(StyleGAN3's ``metrics/inception_score.py``: 10 splits; ADM's evaluator: parts of 5 000). It needs the
extractor's class probabilities: the ``fmnist-classifier`` has them (10 classes); the FID Inception file
fewstep knows (``default_1.pt``) holds the pool features only, so IS is not available for it.

**Precision and recall** (Kynkäänniemi et al. 2019, k = 3): each set's manifold is the union of balls
around its feature vectors with radius the distance to the k-th nearest *other* vector of the same set.
Precision is the fraction of generated vectors inside the real manifold, recall the fraction of real
vectors inside the generated manifold. Distances are Euclidean, computed in float64 in chunks (ADM's
``ManifoldEstimator`` and StyleGAN3's ``precision_recall.py`` use the same definition).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

K_NEIGHBOURS = 3


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) ‖ p(y))) over ``splits`` consecutive equal parts of ``probs`` (N, K)
    (rows sum to 1; a part gets ⌊N/splits⌋ rows, the rest is dropped as StyleGAN3 does)."""
    if probs.ndim != 2 or probs.shape[0] < splits:
        raise ValueError(f"inception_score needs (N, K) probabilities with N ≥ splits = {splits}, got "
                         f"{tuple(probs.shape)}")
    p = probs.double()
    size = p.shape[0] // splits
    scores = []
    for i in range(splits):
        part = p[i * size:(i + 1) * size]
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    mean = sum(scores) / splits
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)   # population std, as StyleGAN3 (np.std)
    return mean, std


def _pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """(len a, len b) Euclidean distances in float64."""
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d2.clamp_min(0).sqrt()


def knn_radii(features: Tensor, k: int = K_NEIGHBOURS, chunk: int = 4096) -> Tensor:
    """(N,) distance of each vector to its k-th nearest other vector of the same set (float64)."""
    f = features.double()
    if f.shape[0] <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} vectors, got {f.shape[0]}")
    out = []
    for start in range(0, f.shape[0], chunk):
        d = _pairwise_distances(f[start:start + chunk], f)
        out.append(d.kthvalue(k + 1, dim=1).values)          # the 1st smallest is the vector itself (0)
    return torch.cat(out)


def coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int = 4096) -> float:
    """Fraction of ``queries`` within ``radii[i]`` of some ``support[i]`` (distance ≤ radius)."""
    q, s = queries.double(), support.double()
    inside = 0
    for start in range(0, q.shape[0], chunk):
        d = _pairwise_distances(q[start:start + chunk], s)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(real: Tensor, fake: Tensor, k: int = K_NEIGHBOURS) -> tuple[float, float]:
    """(precision, recall) of ``fake`` (M, D) against ``real`` (N, D), Kynkäänniemi et al. with k neighbours."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall needs (N, D) and (M, D) features, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    precision = coverage(fake, real, knn_radii(real, k))
    recall = coverage(real, fake, knn_radii(fake, k))
    return precision, recall


__all__ = ["K_NEIGHBOURS", "coverage", "inception_score", "knn_radii", "precision_recall"]
