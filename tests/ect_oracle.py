"""Closed forms for consistency models on Gaussian data, in EDM σ.

Data: x | y ~ N(μ_y, s²I). The probability-flow ODE in σ keeps the standardised deviation
(x_σ − μ)/√(s² + σ²) fixed, so the consistency function with boundary σ_min (f*(x, σ_min) = x, as the CM
preconditioning enforces) is affine:

    f*(x_σ, σ) = μ_y + a(σ)·(x_σ − μ_y),   a(σ) = √(s² + σ_min²)/√(s² + σ²).

For one (x, ε) pair both CT points are affine in (x − μ, ε):

    f*(x + σ_t ε, σ_t) − f*(x + σ_r ε, σ_r) = (a_t − a_r)·(x − μ) + (a_t σ_t − a_r σ_r)·ε,

so per dimension the residual is N(0, v) with v = (a_t − a_r)²·s² + (a_t σ_t − a_r σ_r)²; a target below
the boundary is x + σ_min·ε (σ_r raised to σ_min, a_r = 1). As σ_r → σ_t,
v/(σ_t − σ_r)² → (s² + σ_min²)·s²/(s² + σ_t²)² (the squared σ-derivative of f* along fixed (x, ε)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fewstep.objectives.edm import cm_preconditioning, sigma_from_t


def a_of(sigma: Tensor | float, std: float, sigma_min: float = 0.002) -> Tensor:
    """a(σ) = √(s² + σ_min²)/√(s² + σ²): the slope of the exact consistency function."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return math.sqrt(std ** 2 + sigma_min ** 2) / (std ** 2 + sigma ** 2).sqrt()


def residual_variance(sigma_t: Tensor, sigma_r: Tensor, std: float, sigma_min: float = 0.002) -> Tensor:
    """v per dimension of f*(x + σ_t ε, σ_t) − f*(x + σ_r ε, σ_r), σ_r raised to σ_min."""
    s_r = torch.as_tensor(sigma_r, dtype=torch.float64).clamp(min=sigma_min)
    a_t, a_r = a_of(sigma_t, std, sigma_min), a_of(s_r, std, sigma_min)
    return (a_t - a_r) ** 2 * std ** 2 + (a_t * sigma_t - a_r * s_r) ** 2


class EDMGaussianOracle(nn.Module):
    """A backbone F whose CM-preconditioned output is f* (plus c_out·offset, which keeps f(x, σ_min) = x).

    Inverts the preconditioning: given u = c_in·x_σ and the toolkit time t (σ = t/(1 − t)), returns
    F = (f* − c_skip·x_σ)/c_out (0 where c_out = 0, i.e. at σ_min) + offset.

    Args:
        means: (K + 1, C, H, W) class means, row K for the null label.
        std: data std s.
        offset: additive error on F (a trainable scalar, so gradients can be checked).
    """

    def __init__(self, means: Tensor, std: float, offset: float = 0.0, sigma_data: float = 0.5,
                 sigma_min: float = 0.002):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.std, self.sigma_data, self.sigma_min = std, sigma_data, sigma_min
        self.offset = nn.Parameter(torch.tensor(float(offset), dtype=means.dtype))
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.seen_t: list[Tensor] = []

    def forward(self, u: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        self.seen_t.append(t.detach())
        y = y if y is not None else torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        mu = self.means[y]
        sigma = sigma_from_t(t.double())
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in cm_preconditioning(sigma, self.sigma_data, self.sigma_min))
        x_sigma = u.double() / c_in
        f_star = mu + a_of(sigma, self.std, self.sigma_min).view(-1, 1, 1, 1) * (x_sigma - mu)
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        F = torch.where(c_out == 0, torch.zeros_like(f_star), (f_star - c_skip * x_sigma) / safe)
        return F + self.offset
