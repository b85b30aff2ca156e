"""Small pieces shared by objectives: time samplers, label dropout, per-sample reductions.

All times follow the toolkit convention: t = 1 is noise, t = 0 is data.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


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


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``x_t = (1 − t)·x + t·noise`` (t = 1 noise, t = 0 data); x and noise (B, C, H, W), t (B,) in [0, 1].
    The one interpolation of every in-tree objective, and plugins' (``fewstep.api.interpolate``)."""
    t = per_sample(t, x).to(x.dtype)
    return (1 - t) * x + t * noise


def adaptive_weight(L: Tensor, p: float, c: float) -> Tensor:
    """MeanFlow's adaptive loss weight 1/sg((L + c)^p) of per-sample losses L (B,) (p = 1, c = 0.01 on
    ImageNet; objectives.md §2.2): loss = weight·L normalises L to ≈ 1 without a gradient through it."""
    return 1.0 / (L.detach() + c) ** p


def two_logit_normal_times(n: int, mean: float, std: float, equal_fraction: float,
                           generator: torch.Generator | None, device: torch.device,
                           dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """MeanFlow's (t, r) sampler: two independent σ(N(mean, std²)) draws, t = max and r = min, then the
    first round(equal_fraction·n) samples (half up) get r = t. Each (n,) in (0, 1) with r ≤ t.

    Randomness, in order: n normals (first draw), n normals (second draw) from ``generator``.
    """
    a = logit_normal(n, mean, std, generator, device).to(dtype)
    b = logit_normal(n, mean, std, generator, device).to(dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    k = int(equal_fraction * n + 0.5)
    equal = torch.arange(n, device=device) < k
    return t, torch.where(equal, t, r)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` (and its children) in eval mode for a block, restoring each one's mode after
    (guidance and bootstrap passes of the online net run in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def jump(x: Tensor, t: Tensor, s: Tensor, u: Tensor) -> Tensor:
    """x_s = x_t − (t − s)·u: the jump t → s of an average velocity u (MeanFlow's map); x, u (B, C, H, W)
    and t, s (B,); computed in x's dtype."""
    return x - per_sample(t - s, x).to(x.dtype) * u.to(x.dtype)


def flow_map_step(net: nn.Module, x: Tensor, t: Tensor, s: Tensor, y: Tensor | None, noise: Tensor | None,
                  restart: bool, who: str) -> Tensor:
    """One sampling jump of a two-time network u(x, t, s) (average velocity over [s, t]): straight to s,
    x_s = x_t − (t − s)·u(x_t, t, s); or (``restart``) to the data end, x̂₀ = x_t − t·u(x_t, t, 0), then
    re-noised to s (:func:`renoise`). x (B, C, H, W); t, s (B,)."""
    if not restart:
        return jump(x, t, s, net(x, t.to(x.dtype), s.to(x.dtype), y=y))
    zero = torch.zeros_like(t)
    x0 = jump(x, t, zero, net(x, t.to(x.dtype), zero.to(x.dtype), y=y))
    return renoise(x0, s, noise, who)


def renoise(x0: Tensor, s: Tensor, noise: Tensor | None, who: str) -> Tensor:
    """(1 − s)·x̂₀ + s·noise: a data-end prediction x̂₀ re-noised to time s (consistency and restart
    samplers); x̂₀ itself when no noise is given and every s is 0. ``who`` names the sampler in errors."""
    if noise is None:
        if bool((s > 0).any()):
            raise ValueError(f"{who} to s > 0 needs noise= (the sampler passes it when needs.renoise)")
        return x0
    return per_sample(1 - s, x0).to(x0.dtype) * x0 + per_sample(s, x0).to(x0.dtype) * noise.to(x0.dtype)
