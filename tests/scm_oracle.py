"""Closed forms for sCM on Gaussian class data, in TrigFlow variables.

Data x₀ | y ~ N(μ_y, s²I); TrigFlow x_τ = cos τ·x₀ + sin τ·z, z ~ N(0, σ_d²I), so x_τ | y ~ N(cos τ·μ_y,
S(τ)²I) with S(τ)² = cos²τ·s² + sin²τ·σ_d². Every dimension is an independent 1-D Gaussian, and the
probability-flow ODE, a deterministic monotone transport between these marginals, is the affine map
that matches mean and std:

    x_τ(τ) = cos τ·μ + (S(τ)/s)·(x₀ − μ),   so   f*(x_τ, τ) = μ + (s/S(τ))·(x_τ − cos τ·μ)   (x_τ → x₀),
    dx_τ/dτ = −sin τ·μ + sin τ cos τ·(σ_d² − s²)/S(τ)²·(x_τ − cos τ·μ)
            (= E[cos τ·z − sin τ·x₀ | x_τ], the posterior mean of sCT's conditional velocity).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.objectives.common import per_sample
from fewstep.objectives.trigflow import state_scale, tau_from_t


def S(tau: Tensor, s: float, sigma_d: float) -> Tensor:
    """Std of x_τ | y, (B,)."""
    return torch.sqrt(torch.cos(tau) ** 2 * s ** 2 + torch.sin(tau) ** 2 * sigma_d ** 2)


def exact_consistency(x_tau: Tensor, tau: Tensor, mu: Tensor, s: float, sigma_d: float) -> Tensor:
    """f*(x_τ, τ): the PF-ODE map from τ to 0, (B, C, H, W)."""
    return mu + per_sample(s / S(tau, s, sigma_d), x_tau) * (x_tau - per_sample(torch.cos(tau), mu) * mu)


def pf_velocity(x_tau: Tensor, tau: Tensor, mu: Tensor, s: float, sigma_d: float) -> Tensor:
    """The probability-flow velocity dx_τ/dτ at x_τ, (B, C, H, W)."""
    cos, sin = torch.cos(tau), torch.sin(tau)
    gain = sin * cos * (sigma_d ** 2 - s ** 2) / S(tau, s, sigma_d) ** 2
    return -per_sample(sin, mu) * mu + per_sample(gain, x_tau) * (x_tau - per_sample(cos, mu) * mu)


class SCMGaussianOracle(nn.Module):
    """A backbone whose sCM consistency function is exactly f* (plus ``error`` added to its output).

    Called like the DiT with *our* (x_t, t); it converts to TrigFlow and returns F* = (cos τ·x_τ − f*)/
    (σ_d sin τ) (``trigflow``) or v* = (x_t − f*)/t (``velocity``). Valid for t ∈ (0, 1].

    Args:
        means: (K + 1, C, H, W) class means (row K = null label).
        s: data std; sigma_d: the objective's σ_d.
    """

    def __init__(self, means: Tensor, s: float, sigma_d: float, parameterization: str = "trigflow",
                 error: float = 0.0):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.s, self.sigma_d, self.parameterization, self.error = s, sigma_d, parameterization, error
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        assert s is None and not cond, "sCM calls a one-time backbone"
        self.seen.append((x.detach(), t.detach()))
        mu = self.means[y if y is not None else torch.full_like(t, self.num_classes, dtype=torch.long)]
        tau = tau_from_t(t, self.sigma_d)
        x_tau = x / per_sample(state_scale(tau, self.sigma_d), x)
        f = exact_consistency(x_tau, tau, mu.to(x.dtype), self.s, self.sigma_d)
        if self.parameterization == "trigflow":
            out = (per_sample(torch.cos(tau), x) * x_tau - f) / per_sample(self.sigma_d * torch.sin(tau), x)
        else:
            out = (x - f) / per_sample(t, x)
        return out + self.error + self.bias
