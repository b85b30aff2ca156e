"""Learning-rate and EMA schedules, in images seen (kimg), as edm2 states them.

Everything here is a pure function of the images seen, so a resumed run follows the same schedule and
changing ``train.batch`` does not move a warm-up or a half-life. The trainer calls
:meth:`TrainingSchedule.apply` once per optimizer step, with the images seen once that step is done.

**Learning rate** (``train.lr_schedule``; ``train.lr`` is the peak):

* ``constant``: ``lr`` (every existing recipe).
* ``cosine``: from ``lr`` down to ``lr_min`` along half a cosine over ``lr_decay_kimg`` (default: the rest
  of the run after the warm-up).
* ``rsqrt``: ``lr / sqrt(max(kimg / lr_decay_kimg, 1))``: constant until ``lr_decay_kimg``, then inverse
  square root decay (edm2, Karras et al. 2024, §2.4 / Eq. 16: α_ref / sqrt(max(t / t_ref, 1))).

Any of them is multiplied by a linear warm-up ``min(kimg / lr_warmup_kimg, 1)``.

**EMA tracks** (evaluation weights, named; ``fewstep sample --weights NAME``), three kinds side by side:

* ``ema_betas``: a decay per optimizer step, β (every existing recipe). Its horizon in images grows
  with the batch.
* ``ema_halflife_kimg``: a half-life in kimg, h: β = 0.5^(batch / h), so after N images the old weights
  weigh 0.5^(N / h) whatever the batch (EDM, Karras et al. 2022, App. F.3). With ``ema_rampup_ratio`` r
  the half-life is at most r × the images seen, so early tracks forget their random init faster.
* ``ema_power_std``: edm2's power-function EMA of relative width σ_rel (Karras et al. 2024, §3.1):
  β = (1 − batch / n)^(γ + 1) after n images, which averages the whole run with weights ∝ n^γ; γ is
  the root of σ_rel² = (γ + 1) / ((γ + 2)² (γ + 3)) (their Eq. 3), so σ_rel < √(1/12) ≈ 0.289. The
  paper's tracks are σ_rel = 0.05 and 0.10. The first step copies the weights (β = 0).

See docs/design/schedules.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from fewstep.config import TrainConfig

LR_SCHEDULES = ("constant", "cosine", "rsqrt")
MAX_POWER_STD = math.sqrt(1 / 12)   # σ_rel at γ = 0 (a uniform average of the whole run)


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


def lr_at(train: TrainConfig, kimg: float) -> float:
    """The learning rate at ``kimg`` thousand images seen (see the module docstring)."""
    peak = train.lr
    if train.lr_schedule == "constant":
        lr = peak
    elif train.lr_schedule == "cosine":
        length = train.lr_decay_kimg if train.lr_decay_kimg is not None else train.total_kimg - train.lr_warmup_kimg
        progress = min(max((kimg - train.lr_warmup_kimg) / length, 0.0), 1.0) if length > 0 else 1.0
        lr = train.lr_min + (peak - train.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
    elif train.lr_schedule == "rsqrt":
        lr = peak / math.sqrt(max(kimg / train.lr_decay_kimg, 1.0))
    else:
        raise ValueError(f"unknown lr_schedule {train.lr_schedule!r} (valid: {', '.join(LR_SCHEDULES)})")
    if train.lr_warmup_kimg > 0:
        lr *= min(kimg / train.lr_warmup_kimg, 1.0)
    return lr


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


@dataclass
class TrainingSchedule:
    """The per-step learning rate and EMA decays of a run's ``train`` config."""

    train: TrainConfig

    def __post_init__(self) -> None:
        t = self.train
        self.gammas = {name: power_std_to_exponent(std) for name, std in t.ema_power_std.items()}
        self.varies = t.lr_schedule != "constant" or t.lr_warmup_kimg > 0 or bool(t.ema_halflife_kimg) or bool(
            self.gammas)

    def ema_betas(self, nimg: int) -> dict[str, float]:
        """Decays of the half-life and power-function tracks for the step that ends at ``nimg`` images."""
        t = self.train
        betas = {name: halflife_beta(h, t.batch, nimg, t.ema_rampup_ratio) for name, h in t.ema_halflife_kimg.items()}
        betas.update({name: power_beta(g, t.batch, nimg) for name, g in self.gammas.items()})
        return betas

    def apply(self, optimizer: torch.optim.Optimizer, objective: torch.nn.Module, nimg: int) -> float:
        """Set the learning rate and the varying EMA decays for the optimizer step that ends at ``nimg``
        images; returns the learning rate. A run with the defaults (constant lr, per-step decays) is
        left exactly as it was built."""
        if not self.varies:
            return self.train.lr
        lr = lr_at(self.train, nimg / 1000)
        for group in optimizer.param_groups:
            group["lr"] = lr
        objective.ema_betas.update(self.ema_betas(nimg))
        return lr
