"""Shortcut models (Frans, Hafner, Levine & Abbeel, arXiv 2410.12557) as a fewstep objective plugin.

In fewstep's convention (t = 1 noise, t = 0 data, x_t = (1 − t)·x + t·ε) the network F_θ(x_t, t, s, y)
is the average velocity of a jump of size d = t − s (the backbone embeds t and the gap d), and one
jump is x_s = x_t − d·F_θ(x_t, t, s, y). With M = 2^K the finest number of steps:

* flow-matching samples: t = j/M, j ~ U{1 … M}, s = t − 1/M; target ε − x (the paper's d → 0 level,
  trained at the finest step as in the authors' code);
* self-consistency samples (a fraction ``bootstrap_fraction`` of the batch): level k ~ U{0 … K−1},
  d = 2^−k, t = j·d with j ~ U{1 … 2^k}; target = mean of two half jumps of the EMA teacher F⁻:
  u₁ = F⁻(x_t, t, t − d/2), x′ = x_t − (d/2)·u₁, u₂ = F⁻(x′, t − d/2, t − d), target = (u₁ + u₂)/2,
  so one jump of size d learns to match two of size d/2 (no gradient through the target).

Loss: per-sample mean over C·H·W of (F_θ(x_t, t, t − d, y) − target)², averaged over the batch.
Labels are dropped to the null class with probability ``label_dropout``; there is no guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep import api


@dataclass(kw_only=True)
class ShortcutConfig(api.ObjectiveConfig):
    """Shortcut-model settings.

    Attributes:
        levels: K; the finest step is 1/2^K (the paper: K = 7, 128 steps).
        bootstrap_fraction: share of each batch with self-consistency targets (paper code: 1/8);
            at least one sample when > 0.
        teacher_beta: per-step EMA decay of the teacher that builds the targets (paper: 0.999).
        label_dropout: probability of training a sample with the null label.
    """

    name: str = "shortcut"
    levels: int = 7
    bootstrap_fraction: float = 0.25
    teacher_beta: float = 0.999
    label_dropout: float = 0.1


class Shortcut(api.Objective):
    """Shortcut model: flow matching at the finest step plus self-consistency across step sizes."""

    Config = ShortcutConfig
    needs = api.ObjectiveNeeds(time_inputs=2, jvp=False, teacher="ema", cfg="none")
    config: ShortcutConfig

    def __init__(self, backbone: nn.Module, config: ShortcutConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        super().__init__(backbone, config, num_classes, ema_betas)
        self.teacher = api.frozen_copy(backbone)

    def teacher_tracks(self) -> list[tuple[nn.Module, float]]:
        return [(self.teacher, self.config.teacher_beta)]

    def train(self, mode: bool = True) -> "Shortcut":
        """Train/eval the objective; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> api.LossOutput:
        """Loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``."""
        cfg, B, dev = self.config, x.shape[0], x.device
        n_boot = min(B, max(1, round(B * cfg.bootstrap_fraction))) if cfg.bootstrap_fraction > 0 else 0
        M = 2 ** cfg.levels
        k = torch.randint(cfg.levels, (n_boot,), generator=generator, device=dev)
        d_boot = 0.5 ** k.float()
        j_boot = torch.floor(api.rand(n_boot, generator, dev) * 2.0 ** k.float()) + 1
        j_fm = torch.randint(1, M + 1, (B - n_boot,), generator=generator, device=dev).float()
        d = torch.cat([d_boot, torch.full((B - n_boot,), 1 / M, device=dev)])
        t = torch.cat([j_boot * d_boot, j_fm / M]).clamp(max=1.0)
        eps = api.randn(tuple(x.shape), generator, dev, x.dtype)
        x_t = api.interpolate(x, eps, t)
        y, _ = api.drop_labels(y, cfg.label_dropout, self.num_classes, generator)

        target = api.velocity(x, eps)
        if n_boot:
            with torch.no_grad():
                b = slice(0, n_boot)
                yb = None if y is None else y[b]
                half = d[b] / 2
                u1 = self.teacher(x_t[b], t[b], t[b] - half, y=yb)
                x_mid = x_t[b] - api.per_sample(half, u1) * u1
                u2 = self.teacher(x_mid, t[b] - half, t[b] - d[b], y=yb)
                target = torch.cat([(u1 + u2) / 2, target[n_boot:]])
        F = self.backbone(x_t, t, t - d, y=y)
        per = api.mean_flat((F.float() - target.float()) ** 2)
        logs = {"loss_fm": per[n_boot:].detach().mean() if n_boot < B else 0.0,
                "loss_bootstrap": per[:n_boot].detach().mean() if n_boot else 0.0,
                "nonfinite": (~torch.isfinite(per.detach())).sum()}
        return api.LossOutput(loss=per.mean(), per_sample=per.detach(), logs=logs)

    def flops_per_sample(self, forward_flops: float) -> float:
        """Forward + backward (3 F) for every sample, plus two no-grad teacher forwards (2 F) for the
        bootstrap share: (3 + 2·bootstrap_fraction)·F."""
        return (3.0 + 2.0 * self.config.bootstrap_fraction) * forward_flops

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: api.Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One jump x_s = x_t − (t − s)·F(x_t, t, s, y); x (B, C, H, W), t and s (B,)."""
        if cond.guidance is not None and bool((cond.guidance != 1).any()):
            raise ValueError("shortcut has no classifier-free guidance; sample with guidance 1 or None")
        net = net if net is not None else self.backbone
        F = net(x, t.to(x.dtype), s.to(x.dtype), y=cond.y)
        return x - api.per_sample(t - s, x).to(x.dtype) * F.to(x.dtype)

