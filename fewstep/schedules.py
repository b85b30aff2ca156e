"""Learning-rate schedules and the per-step EMA decays, in images seen (kimg), as edm2 states them.

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

**EMA tracks** (evaluation weights, named; ``fewstep sample --weights NAME``): a fixed per-step decay, a
half-life in kimg or edm2's power-function EMA (:mod:`fewstep.ema`); :class:`TrainingSchedule` sets the
decays of the last two before each step.

See docs/design/schedules.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fewstep.ema import halflife_beta, power_beta, power_std_to_exponent

if TYPE_CHECKING:
    import torch

    from fewstep.config import TrainConfig

LR_SCHEDULES = ("constant", "cosine", "rsqrt")


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
