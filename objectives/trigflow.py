"""TrigFlow (Lu & Song 2024) ↔ the toolkit's time convention, matched by signal-to-noise ratio.

Ours: ``x_t = (1 − t)·x + t·σ_p·ε`` (t = 1 noise, σ_p = prior std, 1 in fewstep).
TrigFlow: ``x_τ = cos τ·x + sin τ·σ_d·ε``, τ ∈ [0, π/2] (σ_d = data std, 0.5 for pixels in [−1, 1]).
With the *same* x and ε, the two states describe the same noise level when their EDM σ agree,
``σ = σ_p·t/(1 − t) = σ_d·tan τ`` (docs/design/objectives.md §8.3), so

    τ = atan2(σ_p·t, σ_d·(1 − t)),            t = σ_d·sin τ / (σ_p·cos τ + σ_d·sin τ),
    x_t = k(τ)·x_τ,  k(τ) = σ_p / (σ_p·cos τ + σ_d·sin τ)   (= (1 − t)/cos τ = t·σ_p/(σ_d·sin τ)).

k is written without any division by cos τ or (1 − t), so every map here is smooth and finite on the
closed ranges t ∈ [0, 1] and τ ∈ [0, π/2] (t = 1 ↔ τ = π/2, where x_τ = (σ_d/σ_p)·x_t). Only the EDM σ
itself, ``σ_d·tan τ``, is unbounded, and nothing here uses it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.objectives.common import per_sample


def tau_from_t(t: Tensor, sigma_d: float, sigma_p: float = 1.0) -> Tensor:
    """Our t ∈ [0, 1] (B,) → TrigFlow τ ∈ [0, π/2] (B,)."""
    return torch.atan2(sigma_p * t, sigma_d * (1 - t))


def t_from_tau(tau: Tensor, sigma_d: float, sigma_p: float = 1.0) -> Tensor:
    """TrigFlow τ ∈ [0, π/2] (B,) → our t ∈ [0, 1] (B,)."""
    s = sigma_d * torch.sin(tau)
    return s / (sigma_p * torch.cos(tau) + s)


def state_scale(tau: Tensor, sigma_d: float, sigma_p: float = 1.0) -> Tensor:
    """k(τ) (B,) with x_t = k(τ)·x_τ; k ∈ [σ_p/√(σ_p² + σ_d²), max(1, σ_p/σ_d)]."""
    return sigma_p / (sigma_p * torch.cos(tau) + sigma_d * torch.sin(tau))


def to_trigflow(x_t: Tensor, t: Tensor, sigma_d: float, sigma_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """(x_t (B, C, H, W), t (B,)) in our convention → (x_τ, τ) in TrigFlow, same x and ε."""
    tau = tau_from_t(t, sigma_d, sigma_p)
    return x_t / per_sample(state_scale(tau, sigma_d, sigma_p), x_t), tau


def from_trigflow(x_tau: Tensor, tau: Tensor, sigma_d: float, sigma_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """(x_τ (B, C, H, W), τ (B,)) in TrigFlow → (x_t, t) in our convention, same x and ε."""
    return x_tau * per_sample(state_scale(tau, sigma_d, sigma_p), x_tau), t_from_tau(tau, sigma_d, sigma_p)


def tau_from_sigma(sigma: Tensor | float, sigma_d: float) -> Tensor | float:
    """EDM σ ≥ 0 → τ = arctan(σ/σ_d) (the sCM time proposal and σ_max → t_max)."""
    if isinstance(sigma, Tensor):
        return torch.atan(sigma / sigma_d)
    return math.atan(sigma / sigma_d)
