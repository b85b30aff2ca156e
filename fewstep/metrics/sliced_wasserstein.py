"""Sliced Wasserstein distance between two point sets (Rabin et al., 2011; Bonneel et al., 2015).

SW_p(μ, ν)^p = E_θ W_p^p(θ#μ, θ#ν), θ uniform on the unit sphere S^{D−1}, where θ#μ is the law of
⟨x, θ⟩; the default is p = 2 (SW₂), p = 1 is also available. In one dimension
W_p^p(α, β) = ∫₀¹ |Q_α(q) − Q_β(q)|^p dq with Q the quantile function. For the empirical
measures of N and M points, Q is the step function ``Q(q) = sorted[⌊qN⌋]``; the integral is taken with
the midpoint rule on the common grid q_i = (i + ½)/G, G = max(N, M), which is exact when one of N, M
divides the other (in particular N = M, where it pairs the i-th smallest projections). The expectation
over θ is a Monte-Carlo mean over ``num_projections`` random directions.

Properties (used by the tests): SW₂(a, a) = 0; SW₂(c·a, c·b) = |c|·SW₂(a, b); it is invariant to a common
translation; and for a shift b = a + Δ, SW₂² = mean_θ ⟨Δ, θ⟩² → ‖Δ‖²/D (and SW₁ = mean_θ |⟨Δ, θ⟩|,
2‖Δ‖/π in 2-D). Units are those of the data.
"""
from __future__ import annotations


import torch
from torch import Tensor


def random_directions(num: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """(num, dim) float64 unit vectors, uniform on S^{dim−1} (normalised Gaussians) from ``generator``
    (a CPU generator; default: the global RNG)."""
    if num < 1 or dim < 1:
        raise ValueError(f"need num ≥ 1 directions in dim ≥ 1, got {num}, {dim}")
    theta = torch.randn((num, dim), generator=generator, dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def _quantile_index(n: int, grid: int) -> Tensor:
    """(grid,) int64 indices ⌊q_i·n⌋ into n sorted values, q_i = (i + ½)/grid (integer arithmetic)."""
    i = torch.arange(grid, dtype=torch.int64)
    return ((2 * i + 1) * n) // (2 * grid)


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 1024,
                       generator: torch.Generator | None = None, chunk: int = 128, p: int = 2) -> float:
    """SW_p (default SW₂) between the empirical measures of ``a`` (N, D) and ``b`` (M, D), in data units.

    Args:
        a, b: point sets with the same dimension D (any float dtype/device; computed in float64 on CPU).
        num_projections: random directions θ in the Monte-Carlo mean.
        generator: CPU generator for the directions; ``None`` uses a fixed seed (0), so the metric is
            deterministic and two calls compare the same slices.
        chunk: directions processed at once (bounds memory to ~max(N, M)·chunk floats).
        p: the order, 1 or 2.
    Returns:
        SW_p ≥ 0 as a Python float.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced_wasserstein needs (N, D) and (M, D) point sets with the same D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"sliced_wasserstein needs non-empty point sets, got {a.shape[0]} and {b.shape[0]} points")
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("sliced_wasserstein got non-finite points (NaN or inf); the samples diverged")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = random_directions(num_projections, a.shape[1], generator)
    grid = max(a.shape[0], b.shape[0])
    ia, ib = _quantile_index(a.shape[0], grid), _quantile_index(b.shape[0], grid)
    total = 0.0
    for th in theta.split(chunk):
        qa = (a @ th.T).sort(dim=0).values[ia]                  # (G, chunk) quantiles of each slice
        qb = (b @ th.T).sort(dim=0).values[ib]
        total += float((qa - qb).abs().pow(p).mean(dim=0).sum())    # Σ over slices of W_p^p
    return (total / num_projections) ** (1 / p)
