"""Closed-form flow maps of Gaussian class data, for testing Terminal Velocity Matching.

Data x | c ~ N(μ_c, σ²I); the null class ∅ is its own Gaussian N(μ_∅, σ²I). With x_t = (1 − t)·x + t·ε,
d(t) = (1 − t)²σ² + t² and a(t) = (t − (1 − t)σ²)/d(t), the velocity of class c is
v_c(x, t) = a(t)·(x − (1 − t)μ_c) − μ_c (see ``gaussian.py``). It is affine in μ_c, so the guided field
v_∅ + w·(v_c − v_∅) is the velocity of N(μ_w, σ²I) with μ_w = μ_∅ + w·(μ_c − μ_∅), and its
probability-flow map from t to s is

    X(x_t, t, s) = (1 − s)·μ_w + √(d(s)/d(t))·(x_t − (1 − t)·μ_w).

Writing X = x_t + (s − t)·F: F = −μ_w + g(s, t)·(x_t − (1 − t)μ_w) with
g(s, t) = (√(d(s)/d(t)) − 1)/(s − t) = ((s + t) − σ²(2 − s − t)) / (d(t) + √(d(s)·d(t))),
using d(s) − d(t) = (s − t)·((s + t) − σ²(2 − s − t)): smooth at s = t (g(t, t) = a(t)) and free of
divisions by the gap, so it is safe under ``torch.func.jvp``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gaussian import rk4_flow_map  # noqa: F401  (one RK4 for every oracle; tests import it from here)


def d(t: Tensor, sigma: float) -> Tensor:
    """Per-dimension variance of x_t for one class: (1 − t)²σ² + t²."""
    return (1 - t) ** 2 * sigma ** 2 + t ** 2


def gaussian_velocity(x: Tensor, t: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """Exact velocity E[ε − x | x_t] of N(μ, σ²I) data: x (B, …), t (B,), mu (B, …)."""
    tt = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (tt - (1 - tt) * sigma ** 2) / d(tt, sigma) * (x - (1 - tt) * mu) - mu


def guided_velocity(x: Tensor, t: Tensor, mu_c: Tensor, mu_null: Tensor, w: Tensor, sigma: float) -> Tensor:
    """v_∅ + w·(v_c − v_∅) from the two class velocities (w (B,))."""
    v_c, v_null = gaussian_velocity(x, t, mu_c, sigma), gaussian_velocity(x, t, mu_null, sigma)
    return v_null + w.reshape(-1, *([1] * (x.ndim - 1))) * (v_c - v_null)




class FlowMapOracle(nn.Module):
    """A two-time 'backbone' F(x, t, s, y, guidance=β) whose flow map x + (s − t)·k·F is exact.

    w = 1/β (β = 1 without guidance), μ_w = μ_∅ + w·(μ_y − μ_∅), k = w if ``scaled`` else 1.

    Args:
        means: (K + 1, C, H, W) class means; row K is the null class.
        sigma: data std σ.
        scaled: divide by k = w, matching TVM's scaled parameterisation.
        error: constant added to the output (a perturbation of map and velocity alike).
        gap_error: adds gap_error·(t − s)·x, which changes the map but not the velocity (gap 0).
    """

    def __init__(self, means: Tensor, sigma: float, scaled: bool = True, error: float = 0.0,
                 gap_error: float = 0.0):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.sigma, self.scaled, self.error, self.gap_error = sigma, scaled, error, gap_error
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        s = t if s is None else s
        shape = (-1, *([1] * (x.ndim - 1)))
        dtype = torch.promote_types(x.dtype, self.means.dtype)
        x = x.to(dtype)
        beta = torch.ones_like(t) if guidance is None else guidance
        w = (1 / beta).to(dtype).reshape(shape)
        if y is None:
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=x.device)
        mu_null = self.means[self.num_classes]
        mu_w = mu_null + w * (self.means[y] - mu_null)
        tt, ss = t.to(dtype).reshape(shape), s.to(dtype).reshape(shape)
        sig2 = self.sigma ** 2
        g = ((ss + tt) - sig2 * (2 - ss - tt)) / (d(tt, self.sigma) + torch.sqrt(d(ss, self.sigma) * d(tt, self.sigma)))
        F = -mu_w + g * (x - (1 - tt) * mu_w)
        if self.scaled:
            F = F / w
        return F + self.error + self.gap_error * (tt - ss) * x

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """The exact X(x_t, t, s) from the closed form (module docstring), for reference."""
        shape = (-1, *([1] * (x.ndim - 1)))
        mu_null = self.means[self.num_classes]
        mu_w = mu_null + w.reshape(shape) * (self.means[y] - mu_null)
        tt, ss = t.reshape(shape), s.reshape(shape)
        return (1 - ss) * mu_w + torch.sqrt(d(ss, self.sigma) / d(tt, self.sigma)) * (x - (1 - tt) * mu_w)


def oracle_means(num_classes: int, shape=(1, 4, 4), seed: int = 0, null_scale: float = 0.5) -> Tensor:
    """(K + 1, *shape) float64 means; the null row is its own (non-zero) Gaussian mean."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn((num_classes + 1, *shape), generator=gen, dtype=torch.float64)
    means[num_classes] *= null_scale
    return means
