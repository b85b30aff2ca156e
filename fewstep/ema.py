"""Exponential moving averages of a network's weights: the copies, the update, and the decays in images.

An objective keeps its evaluation EMA tracks (and TVM's or Shortcut's EMA teacher) as :func:`frozen_copy`
of its backbone and moves them with :func:`ema_update` after every applied step. A track's per-step decay
β comes from one of three kinds (``train.ema_betas``, ``ema_halflife_kimg``, ``ema_power_std``; see
:mod:`fewstep.schedules` for the learning-rate side and docs/design/schedules.md):

* a fixed decay per optimizer step, β (every existing recipe); its horizon in images grows with the batch;
* a half-life in kimg, h: β = 0.5^(batch / h), so after N images the old weights weigh 0.5^(N / h)
  whatever the batch (EDM, Karras et al. 2022, App. F.3); with a ramp-up ratio r the half-life is at most
  r × the images seen;
* edm2's power-function EMA of relative width σ_rel (Karras et al. 2024, §3.1): β = (1 − batch / n)^(γ + 1)
  after n images, weights ∝ n^γ over the whole run, γ the root of σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3))
  (their Eq. 3), so σ_rel < √(1/12) ≈ 0.289; the first step copies the weights (β = 0).
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fewstep.config import TrainConfig

MAX_POWER_STD = math.sqrt(1 / 12)   # σ_rel at γ = 0 (a uniform average of the whole run)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off, in eval mode (EMA tracks and teachers)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin.eval()


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, beta: float) -> None:
    """``p_ema ← β·p_ema + (1 − β)·p`` over parameters; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(ema_params, online_params, 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), online.buffers()):
        b_ema.copy_(b)


def power_std_to_exponent(std: float) -> float:
    """γ of edm2's power-function EMA with relative width ``std`` = σ_rel (Karras et al. 2024, Eq. 3).

    σ_rel(γ) = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) decreases from √(1/12) at γ = 0 towards 0, so the
    root is unique; found by bisection in float64.
    """
    if not 0 < std < MAX_POWER_STD:
        raise ValueError(f"a power-function EMA needs 0 < σ_rel < {MAX_POWER_STD:.4f}, got {std}")

    def width(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = 0.0, 1.0
    while width(hi) > std:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > std else (lo, mid)
    return (lo + hi) / 2


def halflife_beta(halflife_kimg: float, batch: int, nimg: int, rampup_ratio: float | None = None) -> float:
    """Per-step decay of a half-life EMA: 0.5^(batch / h), h in images (at most ``rampup_ratio`` · nimg)."""
    h = halflife_kimg * 1000
    if rampup_ratio is not None:
        h = min(h, nimg * rampup_ratio)
    return 0.5 ** (batch / max(h, 1e-8))


def power_beta(gamma: float, batch: int, nimg: int) -> float:
    """Per-step decay of a power-function EMA after ``nimg`` images: (1 − batch / nimg)^(γ + 1)."""
    return max(1 - batch / nimg, 0.0) ** (gamma + 1) if nimg > 0 else 0.0


def ema_tracks(train: TrainConfig) -> dict[str, float]:
    """Every evaluation EMA track, name → its decay at the first step (the objective builds one copy of
    the backbone per name; tracks whose decay varies get theirs from :meth:`TrainingSchedule.apply`)."""
    tracks = dict(train.ema_betas)
    tracks.update({name: halflife_beta(h, train.batch, train.batch, train.ema_rampup_ratio)
                   for name, h in train.ema_halflife_kimg.items()})
    tracks.update({name: 0.0 for name in train.ema_power_std})
    return tracks
