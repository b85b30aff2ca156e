"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, arXiv 2410.12557); docs/design/frontier.md §6.

The paper uses t = 0 noise and a step size d; in fewstep's convention (t = 1 noise, x_t = (1 − t)·x + t·ε)
its network is the average velocity of a jump of size d = t − s, F_θ(x_t, t, s, y) (the backbone embeds
t and the gap d: ``time_mode="t+h"``), and one jump is x_s = x_t − d·F_θ(x_t, t, s). With K levels and
M = 2^K the finest number of steps:

* flow-matching samples (most of the batch): t = j/M, j ~ U{1 … M}, d = 1/M, target ε − x (the paper's
  d → 0 level, trained at the finest step as the authors' code does), labels dropped to ∅ with
  probability ``label_dropout``;
* self-consistency samples (the first round(bootstrap_fraction·B), at least one): level k cycles through
  0 … K − 1 (k = i mod K, so every level is trained whatever the batch; the authors' code fills equal
  blocks and sends the remainder to k = 0, which trains only d = 1 when B/8 < K), d = 2^−k,
  t = j·d with j ~ U{1 … 2^k}; the target is the mean of two half jumps of the EMA teacher F⁻:

      u₁ = F⁻(x_t, t, t − d/2),  x′ = x_t − (d/2)·u₁,  u₂ = F⁻(x′, t − d/2, t − d),  target = (u₁ + u₂)/2,

  so one jump of size d learns to match two of size d/2 (no gradient through the target).

CFG is baked in at the finest self-consistency level (k = K − 1, whose half jumps are flow-matching
steps): there each teacher call is guided, F⁻_∅ + w·(F⁻_y − F⁻_∅), and coarser levels inherit the
guidance through bootstrapping, so sampling takes none. ``clip`` bounds x′ and the targets (the
authors use ±4 on latents). Loss: mean over C·H·W of (F_θ − target)², averaged over the batch.
Sampling: x_s = x_t − (t − s)·F_θ(x_t, t, s) over the uniform schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.ema import frozen_copy
from fewstep.objectives.common import drop_labels, interpolate, jump, mean_flat, per_sample, rand, randn
from fewstep.registry import objectives


@dataclass(kw_only=True)
class ShortcutConfig(ObjectiveConfig):
    """Shortcut-model settings (defaults: the authors' ImageNet code, objectives.md §5 as restated in
    docs/design/frontier.md §6).

    Attributes:
        levels: K; the finest step is 1/2^K (128 steps at K = 7).
        bootstrap_fraction: share of each batch with self-consistency targets (the code's 1/8).
        teacher_beta: per-step decay of the EMA teacher that builds the targets (0.999).
        label_dropout: probability of the null label on the flow-matching samples.
        guidance: CFG scale w baked into the finest self-consistency level (the authors: 1.5 on
            ImageNet); 1 = none (no extra teacher passes).
        clip: bound |x′| and |target| by this (``None``: no bound).
    """

    name: str = "shortcut"
    levels: int = 7
    bootstrap_fraction: float = 0.125
    teacher_beta: float = 0.999
    label_dropout: float = 0.1
    guidance: float = 1.0
    clip: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.levels >= 1, f"levels must be ≥ 1, got {self.levels}"),
            (0.0 <= self.bootstrap_fraction <= 1.0, f"bootstrap_fraction must lie in [0, 1], got {self.bootstrap_fraction}"),
            (0.0 <= self.teacher_beta <= 1.0, f"teacher_beta must lie in [0, 1], got {self.teacher_beta}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must lie in [0, 1), got {self.label_dropout}"),
            (self.guidance >= 1.0, f"guidance must be ≥ 1, got {self.guidance}"),
            (self.clip is None or self.clip > 0, f"clip must be > 0 (or none), got {self.clip}"),
        ]
        require(checks, "ShortcutConfig")


@dataclass
class ShortcutBatch:
    """Times of one batch: t, d (B,) with s = t − d; ``level`` (B,) int64, K for flow-matching samples;
    the first ``n_boot`` samples are self-consistency ones."""

    t: Tensor
    d: Tensor
    level: Tensor
    n_boot: int


@objectives.register("shortcut", summary="Shortcut models: flow matching at the finest step plus self-consistency "
                                         "across step sizes (EMA teacher, no JVP)")
class Shortcut(Objective):
    """Shortcut model: flow matching at the finest step plus two-half-jump self-consistency targets."""

    Config = ShortcutConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=False, teacher="ema", cfg="distilled")
    config: ShortcutConfig

    def __init__(self, backbone: nn.Module, config: ShortcutConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        super().__init__(backbone, config, num_classes, ema_betas)
        self.teacher = frozen_copy(backbone)

    def teacher_tracks(self) -> list[tuple[nn.Module, float]]:
        return [(self.teacher, self.config.teacher_beta)]

    def train(self, mode: bool = True) -> "Shortcut":
        """Train/eval the objective; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- training -------------------------------------------------------------------------------
    def sample_times(self, n: int, generator: torch.Generator | None, device: torch.device) -> ShortcutBatch:
        """Levels, step sizes and start times (module docstring). Randomness: n uniforms (j of the
        self-consistency samples, then of the flow-matching ones)."""
        cfg, K = self.config, self.config.levels
        n_boot = min(n, max(1, round(n * cfg.bootstrap_fraction))) if cfg.bootstrap_fraction > 0 else 0
        level = torch.full((n,), K, dtype=torch.long, device=device)
        level[:n_boot] = torch.arange(n_boot, device=device) % K
        d = 0.5 ** level.double()
        j = torch.floor(rand(n, generator, device).double() / d) + 1          # U{1 … 1/d}
        t = (j * d).clamp(max=1.0)
        return ShortcutBatch(t=t.float(), d=d.float(), level=level, n_boot=n_boot)

    def teacher_velocity(self, x: Tensor, t: Tensor, s: Tensor, y: Tensor | None, guided: Tensor) -> Tensor:
        """F⁻(x, t, s | y), guided as F⁻_∅ + w·(F⁻_y − F⁻_∅) where ``guided`` (B,) bool; no gradient."""
        w = self.config.guidance
        if y is None or w == 1.0 or not bool(guided.any()):
            return self.teacher(x, t, s, y=y).to(x.dtype)
        null = torch.full_like(y, self.num_classes)
        both = self.teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), y=torch.cat([y, null]))
        f_y, f_null = both.to(x.dtype).chunk(2)
        return torch.where(per_sample(guided, x), f_null + w * (f_y - f_null), f_y)

    @torch.no_grad()
    def bootstrap_target(self, x_t: Tensor, t: Tensor, d: Tensor, y: Tensor | None, guided: Tensor) -> Tensor:
        """(u₁ + u₂)/2 of two teacher half jumps from t (module docstring); x_t (n, C, H, W), t, d (n,)."""
        clip = self.config.clip
        half = d / 2
        u1 = self.teacher_velocity(x_t, t, t - half, y, guided)
        x_mid = x_t - per_sample(half, u1) * u1
        if clip is not None:
            x_mid = x_mid.clamp(-clip, clip)
        u2 = self.teacher_velocity(x_mid, t - half, t - d, y, guided)
        target = (u1 + u2) / 2
        return target.clamp(-clip, clip) if clip is not None else target

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Randomness, in order: B uniforms (times), x-shaped normals (ε), B uniforms (label dropout).
        Logs: ``loss_fm`` and ``loss_bootstrap`` (mean squared error of each part), ``nonfinite``.
        """
        cfg, B = self.config, x.shape[0]
        times = self.sample_times(B, generator, x.device)
        t, d, nb = times.t.to(x.dtype), times.d.to(x.dtype), times.n_boot
        eps = randn(tuple(x.shape), generator, x.device, x.dtype)
        x_t = interpolate(x, eps, t)
        y_drop, dropped = drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        fm = torch.arange(B, device=x.device) >= nb
        y_net = None if y is None else torch.where(fm, y_drop, y)   # dropout on flow-matching samples only
        target = eps - x
        if nb:
            b = slice(0, nb)
            guided = times.level[b] == cfg.levels - 1
            boot = self.bootstrap_target(x_t[b], t[b], d[b], None if y_net is None else y_net[b], guided)
            target = torch.cat([boot, target[nb:]])
        F = self.backbone(x_t, t, t - d, y=y_net)
        acc = torch.promote_types(F.dtype, torch.float32)          # fp32 under bf16 autocast, fp64 stays fp64
        per = mean_flat((F.to(acc) - target.to(acc)) ** 2)
        logs = {"loss_fm": per[nb:].detach().mean() if nb < B else torch.zeros(()),
                "loss_bootstrap": per[:nb].detach().mean() if nb else torch.zeros(()),
                "nonfinite": (~torch.isfinite(per.detach())).sum().float()}
        return LossOutput(loss=per.mean(), per_sample=per.detach(), logs=logs, t=t.detach())

    def flops_per_sample(self, forward_flops: float) -> float:
        """Forward and backward (3 F) for every sample, plus two no-grad teacher forwards (2 F) for the
        self-consistency share, doubled at the guided finest level: about (3 + 2·fraction)·F."""
        return (3.0 + 2.0 * self.config.bootstrap_fraction) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One jump x_s = x_t − (t − s)·F(x_t, t, s, y); x (B, C, H, W), t and s (B,)."""
        if cond.guidance is not None and bool((cond.guidance != 1).any()):
            raise ValueError(f"shortcut bakes its guidance ({self.config.guidance:g}) into training; sample with "
                             f"guidance 1 or None")
        net = net if net is not None else self.backbone
        return jump(x, t, s, net(x, t.to(x.dtype), s.to(x.dtype), y=cond.y))
