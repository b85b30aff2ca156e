"""Small pieces shared by objectives: time samplers, label dropout, per-sample reductions.

All times follow the toolkit convention: t = 1 is noise, t = 0 is data.
"""
from __future__ import annotations

import torch
from torch import Tensor


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise drawn from ``generator`` (which must live on ``device``) or the global RNG."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) uniform samples in [0, 1)."""
    return torch.rand(n, generator=generator, device=device)


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator | None,
                 device: torch.device) -> Tensor:
    """(n,) samples of σ(N(mean, std²)) in (0, 1) (SD3/MeanFlow's logit-normal time density)."""
    return torch.sigmoid(mean + std * randn((n,), generator, device))


def drop_labels(y: Tensor | None, p: float, num_classes: int, generator: torch.Generator | None) -> tuple[Tensor | None, Tensor]:
    """Replace each label by the null label ``num_classes`` with probability ``p``.

    Args:
        y: (B,) int64 labels or ``None`` (unconditional).
    Returns:
        (labels, dropped): the new labels (``None`` stays ``None``) and a (B,) bool mask of dropped ones.
    """
    if y is None or num_classes == 0:
        n = 0 if y is None else y.shape[0]
        return y, torch.zeros(n, dtype=torch.bool)
    dropped = rand(y.shape[0], generator, y.device) < p
    return torch.where(dropped, torch.full_like(y, num_classes), y), dropped


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (B, …) → (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) per-sample value against ``like`` (B, C, H, W)."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))
