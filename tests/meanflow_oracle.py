"""Closed-form flow maps and average velocities for Gaussian class data (MeanFlow's oracle).

Data x | y ~ N(μ, σ²I), x_t = (1 − t)·x + t·ε (t = 1 noise), d(t) = (1 − t)²σ² + t². The marginal
velocity is affine, v*(z, t) = a(t)·(z − (1 − t)μ) − μ with a(t) = (t − (1 − t)σ²)/d(t), and its flow
map from t to r is X = (1 − r)μ + k·(z − (1 − t)μ) with k = √(d(r)/d(t)). The average velocity
u* = (z − X)/(t − r) simplifies to

    u*(z, t, r) = g(t, r)·(z − (1 − t)μ) − μ,   g = ((1 + σ²)(t + r) − 2σ²) / (√d(t)·(√d(t) + √d(r))),

smooth in (t, r) with no division by t − r (g(t, t) = a(t)), so torch.func.jvp differentiates it cleanly.
Guided fields v_∅ + w·(v_y − v_∅) with a shared σ are the velocity of N(w·μ_y + (1 − w)·μ_∅, σ²), so their
average velocity is u* with that mean (checked against RK4 in the tests).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from gaussian import rk4_flow_map  # noqa: F401  (one RK4 for every oracle; tests import it from here)


def _b(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def d(t: Tensor, sigma: float) -> Tensor:
    """d(t) = (1 − t)²σ² + t² = Var(x_t) per dimension around (1 − t)μ."""
    return (1 - t) ** 2 * sigma ** 2 + t ** 2


def velocity(z: Tensor, t: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """Marginal velocity E[ε − x | x_t = z] for data N(μ, σ²I); z, mu (B, …), t (B,)."""
    tt = _b(t, z)
    return (tt - (1 - tt) * sigma ** 2) / d(tt, sigma) * (z - (1 - tt) * mu) - mu


def flow_map(z: Tensor, t: Tensor, r: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """Exact ODE map z_t ↦ z_r of the velocity field of N(μ, σ²I)."""
    tt, rr = _b(t, z), _b(r, z)
    return (1 - rr) * mu + torch.sqrt(d(rr, sigma) / d(tt, sigma)) * (z - (1 - tt) * mu)


def average_velocity(z: Tensor, t: Tensor, r: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """u*(z, t, r) = (z − X)/(t − r), written smoothly in r (instantaneous velocity at r = t)."""
    tt, rr = _b(t, z), _b(r, z)
    sd_t, sd_r = torch.sqrt(d(tt, sigma)), torch.sqrt(d(rr, sigma))
    g = ((1 + sigma ** 2) * (tt + rr) - 2 * sigma ** 2) / (sd_t * (sd_t + sd_r))
    return g * (z - (1 - tt) * mu) - mu


def guided_means(means: Tensor, scale: float) -> Tensor:
    """Rows y < K → scale·μ_y + (1 − scale)·μ_∅ (the guided field's Gaussian); row K (null) unchanged."""
    out = scale * means + (1 - scale) * means[-1:]
    out[-1] = means[-1]
    return out




class AverageVelocityOracle(nn.Module):
    """A two-time 'backbone' u(z, t, s | y) = u*(z, t, s; means[y]) (+ a constant error).

    Args:
        means: (K + 1, C, H, W) per-label Gaussian means; row K is the null label's own Gaussian.
        sigma: data std σ.
        error: constant added to every output (0 = exact).
    """

    def __init__(self, means: Tensor, sigma: float, error: float = 0.0):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.sigma, self.error = sigma, error
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.bias = nn.Parameter(torch.zeros(()))  # a trainable offset: its gradient tests stationarity
        self.calls: list[Tensor | None] = []    # labels of every call, in order
        self.modes: list[bool] = []             # self.training at every call

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        self.calls.append(y)
        self.modes.append(self.training)
        if y is None:
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=x.device)
        mu = self.means[y]
        u = average_velocity(x.to(mu.dtype), t, t if s is None else s, mu, self.sigma)
        return u + self.error + self.bias
