"""EDM σ at the objective boundary, and the consistency-model preconditioning (iCT/ECT).

Toolkit time (t = 1 noise): x_t = (1 − t)·x + t·σ_p·ε, with σ_p the prior std (1 in this toolkit: the
sampler starts from N(0, I)). EDM (Karras et al. 2022) writes the same state as x_σ = x + σ·ε. The two are
the same point up to a scale (docs/design/objectives.md §8.3):

    σ = σ_p·t / (1 − t),    t = σ / (σ + σ_p),    x_σ = x_t / (1 − t).

t = 1 is σ = ∞, so EDM's σ_max = 80 is t_max = σ_max / (σ_max + σ_p) = 80/81 ≈ 0.98765 for σ_p = 1.

Consistency preconditioning (Song et al. 2023 / iCT / ECT at evaluation; docs/design/objectives.md §4):

    f_θ(x_σ, σ) = c_skip(σ)·x_σ + c_out(σ)·F_θ(c_in(σ)·x_σ, t(σ)),
    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),   c_out = (σ − σ_min)·σ_d / √(σ² + σ_d²),
    c_in   = 1 / √(σ² + σ_d²),

so f_θ(x, σ_min) = x exactly (c_skip = 1, c_out = 0): the consistency boundary condition. EDM embeds
c_noise = ¼·ln σ; our backbones embed a time in [0, 1], so the backbone is fed our own t = σ/(σ + σ_p) =
sigmoid(4·c_noise − ln σ_p), a monotone re-parameterisation of the same quantity (one-time call, s=None).
"""
from __future__ import annotations

from torch import Tensor, nn

from fewstep.objectives.common import per_sample


def sigma_from_t(t: Tensor, sigma_p: float = 1.0) -> Tensor:
    """EDM σ = σ_p·t/(1 − t) ∈ [0, ∞) for toolkit times t ∈ [0, 1) (t = 1 maps to ∞)."""
    return sigma_p * t / (1 - t)


def t_from_sigma(sigma: Tensor, sigma_p: float = 1.0) -> Tensor:
    """Toolkit time t = σ/(σ + σ_p) ∈ [0, 1) for σ ∈ [0, ∞)."""
    return sigma / (sigma + sigma_p)


def t_max(sigma_max: float, sigma_p: float = 1.0) -> float:
    """The toolkit time of EDM's largest noise level: σ_max/(σ_max + σ_p) (80/81 for σ_max = 80)."""
    return sigma_max / (sigma_max + sigma_p)


def x_sigma_from_x_t(x_t: Tensor, t: Tensor) -> Tensor:
    """x_σ = x_t/(1 − t): (B, C, H, W) state at toolkit time t (B,) → EDM state (= x + σ·ε)."""
    return x_t / (1 - per_sample(t, x_t)).to(x_t.dtype)


def x_t_from_x_sigma(x_sigma: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x_σ, the inverse of :func:`x_sigma_from_x_t`."""
    return x_sigma * (1 - per_sample(t, x_sigma)).to(x_sigma.dtype)


def cm_preconditioning(sigma: Tensor, sigma_data: float = 0.5,
                       sigma_min: float = 0.002) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in), each shaped like ``sigma`` (B,), for the boundary-respecting CM form.

    c_skip(σ_min) = 1 and c_out(σ_min) = 0 exactly. Valid for σ ≥ σ_min (below it c_out < 0).
    """
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


def consistency_function(net: nn.Module, x_sigma: Tensor, sigma: Tensor, y: Tensor | None, *,
                         sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_p: float = 1.0) -> Tensor:
    """f_θ(x_σ, σ) = c_skip·x_σ + c_out·F_θ(c_in·x_σ, t(σ), s=None, y): the estimate of the data x.

    Args:
        net: backbone ``F(x, t, s=None, y=None)``; it receives c_in·x_σ (unit variance at every σ for
            data of std σ_data) and the toolkit time t = σ/(σ + σ_p) of shape (B,).
        x_sigma: (B, C, H, W) EDM state x + σ·ε.
        sigma: (B,) noise levels σ ≥ σ_min.
        y: (B,) labels (``num_classes`` = null) or ``None``.
    Returns:
        (B, C, H, W) estimate of x, in the dtype of ``x_sigma``, or of the backbone output where
        autocast promotes it.
    """
    c_skip, c_out, c_in = cm_preconditioning(sigma, sigma_data, sigma_min)
    like = x_sigma
    F = net(x_sigma * per_sample(c_in, like).to(like.dtype), t_from_sigma(sigma, sigma_p), y=y)
    return per_sample(c_skip, like).to(like.dtype) * x_sigma + per_sample(c_out, like).to(F.dtype) * F
