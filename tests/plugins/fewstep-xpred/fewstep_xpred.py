"""x-prediction flow matching as a fewstep objective plugin (the example of docs/plugins.md).

The network predicts the clean data, x̂_θ(x_t, t, y) ≈ E[x | x_t], as in "Back to Basics: Let Denoising
Generative Models Denoise" (Li & He 2025, arXiv 2511.13720), and the loss is still flow matching's: in
fewstep's convention (t = 1 noise, x_t = (1 − t)·x + t·ε, velocity v = ε − x = (x_t − x)/t) the implied
velocity is

    v̂ = (x_t − x̂_θ)/max(t, t_eps),    L = mean_CHW (v̂ − (ε − x))²,

so the optimum x̂* = E[x | x_t] is the denoiser and v̂* the flow-matching velocity wherever t ≥ t_eps.
Times are logit-normal; labels are dropped to the null class with probability ``label_dropout`` so that
classifier-free guidance can be applied at sampling, v̂_∅ + w·(v̂_y − v̂_∅) (two evaluations per step).
Sampling is Euler: x_s = x_t + (s − t)·v̂(x_t, t). At t = 1 one jump returns x̂(ε, 1) = E[x | y]: the
class mean, as for any one-step flow-matching sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep import api


@dataclass(kw_only=True)
class XPredictionConfig(api.ObjectiveConfig):
    """x-prediction flow-matching settings.

    Attributes:
        t_mean, t_std: logit-normal time density, t = σ(N(t_mean, t_std²)).
        t_eps: the velocity divides by max(t, t_eps), so nearly clean inputs (t → 0) cannot blow it up.
        label_dropout: probability of the null label (enables CFG at sampling).
        guidance: default CFG scale w at sampling (1: one evaluation per step).
    """

    name: str = "xpred"
    t_mean: float = -0.4
    t_std: float = 1.0
    t_eps: float = 0.05
    label_dropout: float = 0.1
    guidance: float = 1.0


class XPrediction(api.Objective):
    """x-prediction flow matching: the network denoises, the loss is on the implied velocity"""

    Config = XPredictionConfig
    needs = api.ObjectiveNeeds(time_inputs=1, jvp=False, teacher="none", cfg="sampling")
    config: XPredictionConfig

    def implied_velocity(self, x_t: Tensor, t: Tensor, x_hat: Tensor) -> Tensor:
        """v̂ = (x_t − x̂)/max(t, t_eps); x_t, x_hat (B, C, H, W), t (B,)."""
        return (x_t - x_hat) / api.per_sample(t.clamp(min=self.config.t_eps), x_t)

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> api.LossOutput:
        """Loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Randomness, in order: B normals (times), x-shaped normals (ε), B uniforms (label dropout).
        """
        cfg = self.config
        t = api.logit_normal(x.shape[0], cfg.t_mean, cfg.t_std, generator, x.device).to(x.dtype)
        eps = api.randn(tuple(x.shape), generator, x.device, x.dtype)
        x_t = api.interpolate(x, eps, t)
        y, _ = api.drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        x_hat = self.backbone(x_t, t, y=y).to(x.dtype)
        per = api.mean_flat((self.implied_velocity(x_t, t, x_hat) - api.velocity(x, eps)) ** 2)
        logs = {"loss_x": api.mean_flat((x_hat - x) ** 2).detach().mean(),
                "nonfinite": (~torch.isfinite(per.detach())).sum().float()}
        return api.LossOutput(loss=per.mean(), per_sample=per.detach(), logs=logs, t=t.detach())

    def velocity(self, x: Tensor, t: Tensor, cond: api.Condition, net: nn.Module) -> Tensor:
        """Guided v̂_∅ + w·(v̂_y − v̂_∅) at (x, t); one evaluation without guidance."""
        w = self.guidance(cond)
        if w is None:
            return self.implied_velocity(x, t, net(x, t, y=cond.y).to(x.dtype))
        null = torch.full_like(cond.y, self.num_classes)
        x_hat = net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([cond.y, null])).to(x.dtype)
        v_y, v_null = self.implied_velocity(torch.cat([x, x]), torch.cat([t, t]), x_hat).chunk(2)
        return v_null + api.per_sample(w, x).to(x.dtype) * (v_y - v_null)

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: api.Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Euler step x + (s − t)·v̂(x, t); x (B, C, H, W), t and s (B,)."""
        v = self.velocity(x, t.to(x.dtype), cond, net if net is not None else self.backbone)
        return x + api.per_sample(s - t, x).to(x.dtype) * v

    def evaluations_per_step(self, cond: api.Condition) -> int:
        return 1 if self.guidance(cond) is None else 2

    def guidance(self, cond: api.Condition) -> Tensor | None:
        """Per-sample w, or ``None`` when no guidance applies (w = 1 everywhere or no labels)."""
        if cond.y is None or self.num_classes == 0:
            return None
        w = cond.guidance
        if w is None:
            if self.config.guidance == 1.0:
                return None
            return torch.full(cond.y.shape, self.config.guidance, device=cond.y.device)
        return None if bool((w == 1).all()) else w.float()
