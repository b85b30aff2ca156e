"""Class-conditional Gaussian data, where flow-matching quantities are closed-form.

Data: x | y ~ N(μ_y, σ²I). With x_t = (1 − t)·x + t·ε (t = 1 noise), d(t) = (1 − t)²σ² + t² and
r = x_t − (1 − t)·μ_y, the optimal velocity is E[ε − x | x_t] = (t − (1 − t)σ²)/d · r − μ_y, and the
irreducible flow-matching loss per dimension at time t is Var(ε − x | x_t) = σ²/d(t).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


def rk4_flow_map(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, s: Tensor,
                 steps: int = 200) -> Tensor:
    """Integrate dx/dτ = velocity(x, τ) from τ = t to τ = s (both (B,), per sample) with classical RK4."""
    h = (s - t) / steps
    hb = h.reshape(-1, *([1] * (x.ndim - 1)))
    tau = t.clone()
    for _ in range(steps):
        k1 = velocity(x, tau)
        k2 = velocity(x + hb / 2 * k1, tau + h / 2)
        k3 = velocity(x + hb / 2 * k2, tau + h / 2)
        k4 = velocity(x + hb * k3, tau + h)
        x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tau = tau + h
    return x


class GaussianOracle(nn.Module):
    """A 'backbone' returning the exact velocity for Gaussian class data (plus an optional error).

    Args:
        means: (K + 1, C, H, W) class means; row K is the null class (the mixture's mean is not
            Gaussian, so null-label velocities are only exact when all means are equal).
        sigma: data std σ.
        error: scale of a deliberate perturbation added to the output (0 = exact).
    """

    def __init__(self, means: Tensor, sigma: float, error: float = 0.0):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.sigma, self.error = sigma, error
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.bias = nn.Parameter(torch.zeros(()))  # one trainable parameter so optimizers have work
        self.seen_t: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        self.seen_t.append(t.detach())
        mu = self.means[y if y is not None else torch.full_like(t, self.num_classes, dtype=torch.long)]
        tt = t.view(-1, 1, 1, 1).to(x.dtype)
        d = (1 - tt) ** 2 * self.sigma ** 2 + tt ** 2
        v = (tt - (1 - tt) * self.sigma ** 2) / d * (x - (1 - tt) * mu) - mu
        return v + self.error * torch.ones_like(v) + self.bias


def class_means(num_classes: int, shape=(1, 4, 4), seed: int = 0, dtype=torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn((num_classes + 1, *shape), generator=gen, dtype=dtype)
    means[num_classes] = 0.0
    return means


def gaussian_batch(means: Tensor, sigma: float, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = means.shape[0] - 1
    y = torch.randint(k, (n,), generator=gen)
    x = means[y] + sigma * torch.randn((n, *means.shape[1:]), generator=gen, dtype=means.dtype)
    return x, y
