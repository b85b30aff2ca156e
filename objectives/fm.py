"""Flow matching (rectified flow / OT-CFM), the baseline every few-step objective is compared to.

With t = 1 noise: x_t = (1 − t)·x + t·ε, the conditional velocity is v = ε − x, and the network
regresses it: L = E_t ‖v_θ(x_t, t, y) − (ε − x)‖² averaged over C·H·W (Lipman et al. 2023; Liu et al.
2023; SiT). Times are logit-normal (SD3; MeanFlow's ImageNet default (−0.4, 1.0)). Labels are dropped to
the null class with probability ``label_dropout`` so classifier-free guidance can be used at sampling:
v = v_∅ + w·(v_y − v_∅), two backbone evaluations per step. Sampling is Euler over the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import drop_labels, interpolate, logit_normal, mean_flat, per_sample, randn
from fewstep.registry import objectives


@dataclass(kw_only=True)
class FlowMatchingConfig(ObjectiveConfig):
    """Flow-matching settings.

    Attributes:
        t_mean, t_std: logit-normal time density, t = σ(N(t_mean, t_std²)).
        label_dropout: probability of training a sample with the null label (enables CFG).
        guidance: default CFG scale w at sampling (1 = no guidance, one evaluation per step).
    """

    name: str = "fm"
    t_mean: float = -0.4
    t_std: float = 1.0
    label_dropout: float = 0.1
    guidance: float = 1.0


@objectives.register("fm", summary="flow matching: velocity regression, Euler sampling, CFG at sampling")
class FlowMatching(Objective):
    """Flow matching with logit-normal times, label dropout and CFG at sampling."""

    Config = FlowMatchingConfig
    needs = ObjectiveNeeds(time_inputs=1, jvp=False, teacher="none", cfg="sampling")
    config: FlowMatchingConfig

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``."""
        cfg = self.config
        t = logit_normal(x.shape[0], cfg.t_mean, cfg.t_std, generator, x.device)
        eps = randn(tuple(x.shape), generator, x.device, x.dtype)
        x_t = interpolate(x, eps, t)
        y, _ = drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        v = self.backbone(x_t, t, y=y)
        loss = mean_flat((v.float() - (eps - x).float()) ** 2)
        return LossOutput(loss=loss.mean(), per_sample=loss.detach(), logs={"loss_fm": loss.detach().mean()},
                          t=t.detach())

    def velocity(self, x: Tensor, t: Tensor, cond: Condition, net: nn.Module) -> Tensor:
        """Guided velocity v_∅ + w·(v_y − v_∅) at (x, t); one evaluation when w = 1 or unconditional."""
        w = self._guidance(cond, x)
        if w is None:
            return net(x, t, y=cond.y)
        null = torch.full_like(cond.y, self.num_classes)
        v_y, v_null = net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([cond.y, null])).chunk(2)
        return v_null + per_sample(w, x).to(v_y.dtype) * (v_y - v_null)

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Euler step from t to s: x + (s − t)·v(x, t)."""
        v = self.velocity(x, t, cond, net if net is not None else self.backbone)
        return x + per_sample(s - t, x).to(x.dtype) * v.to(x.dtype)

    def evaluations_per_step(self, cond: Condition) -> int:
        return 1 if self._guidance(cond, None) is None else 2

    def _guidance(self, cond: Condition, x: Tensor | None) -> Tensor | None:
        """Per-sample w, or ``None`` when no guidance applies (w = 1 everywhere or no labels)."""
        if cond.y is None or self.num_classes == 0:
            return None
        w = cond.guidance
        if w is None:
            if self.config.guidance == 1.0:
                return None
            w = torch.full(cond.y.shape, self.config.guidance, device=cond.y.device)
        elif bool((w == 1).all()):
            return None
        return w.float()
