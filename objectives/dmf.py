"""Decoupled MeanFlow, DMF (Lee, Yu & Shin 2025, arXiv 2510.24474); docs/design/frontier.md §5. Written
from the paper and that restatement (the official repository has no licence; nothing is taken from it).

DMF turns a flow-matching model into a flow map without new parameters: the backbone's early blocks
see the start time t and its late blocks (and output layer) see the end time s, through the same time
embedder (``time_mode="split"``, ``backbone.split_depth``). At s = t it is the flow-matching model
exactly, so a fewstep ``fm`` run initialises it (``train.init_from``, ``fewstep train --objective dmf
--init-from RUN``). Its output u(x_t, t, s) is the average velocity of the jump t → s.

Fine-tuning (§5.2): per sample two independent branches with their own noise and times, sharing the
label dropout:

* flow matching: t_f ~ logit-normal(0, 1), prediction p_f = u(x_{t_f}, t_f, t_f), target g_f;
* MeanFlow: t₁ ~ LN(0.4, 1), t₂ ~ LN(−1.2, 1), t = max, s = min (far jumps); one JVP along (g, 1, 0)
  gives (u, du/dt) and the original MeanFlow target u_tgt = sg(g − (t − s)·du/dt).

Targets use model guidance (MG): g = (ε − x) + ω·(u(x_t, t, t | y) − u(x_t, t, t | ∅)) for t in
[guidance_t_min, guidance_t_max] with the label kept (two no-grad passes of the current model per
branch), ε − x elsewhere; its fixed point is CFG at scale 1/(1 − ω) (2.5 at ω = 0.6), so sampling needs
no guidance.

Loss (§5.3): with m = mean_CHW (p − target)² and a learned log-variance φ(t, s) (a zero-initialised
linear map of [sin/cos features of t, of s], owned by this objective),

    ℓ = log(e^{−φ}·m + 1) + φ/2,        loss = ½·(ℓ_FM + ℓ_MF).

This is the paper's form, chosen over the official code's log(m·e^{−φ} + 0.01) + φ because its φ has a
finite optimum, φ* = log m, so the weight ∂ℓ/∂m = 1/(m + e^φ) settles at ≈ 1/(m + m̄) (MeanFlow's
adaptive weight with a learned scale), while the code form's φ drifts to −∞ and its weight to 1/m at a
rate that depends on the run length.

Sampling (§5.4): Euler on the flow map, x_s = x_t − (t − s)·u(x_t, t, s); ``sampler="restart"`` jumps
to the data end, x̂₀ = x_t − t·u(x_t, t, 0), and re-noises to s with fresh noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.backbones.layers import timestep_embedding
from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import (drop_labels, eval_mode, flow_map_step, interpolate, logit_normal,
                                       mean_flat, per_sample, randn)
from fewstep.objectives.jvp import backbone_jvp
from fewstep.registry import objectives


@dataclass(kw_only=True)
class DMFConfig(ObjectiveConfig):
    """DMF fine-tuning settings (defaults: the ImageNet-256 XL/2 script; frontier.md §5.5).

    Attributes:
        fm_t_mean, fm_t_std: logit-normal law of the flow-matching branch's time.
        t_mean, t_std: logit-normal law of the first two-time draw (t₁).
        s_mean, s_std: logit-normal law of the second draw (t₂); t = max, s = min.
        label_dropout: probability of the null label, shared by both branches.
        guidance: model-guidance ω (effective CFG 1/(1 − ω)); 0 switches it off.
        guidance_t_min, guidance_t_max: MG applies for t in this closed interval.
        logvar_frequencies: sin/cos features per time of the log-variance φ(t, s).
        sampler: ``euler`` (flow-map jumps) or ``restart`` (jump to the data end and re-noise).
    """

    name: str = "dmf"
    fm_t_mean: float = 0.0
    fm_t_std: float = 1.0
    t_mean: float = 0.4
    t_std: float = 1.0
    s_mean: float = -1.2
    s_std: float = 1.0
    label_dropout: float = 0.1
    guidance: float = 0.6
    guidance_t_min: float = 0.0
    guidance_t_max: float = 0.7
    logvar_frequencies: int = 64
    sampler: Literal["euler", "restart"] = "euler"

    def __post_init__(self) -> None:
        checks = [
            (self.fm_t_std > 0 and self.t_std > 0 and self.s_std > 0, "the logit-normal stds must be > 0"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must lie in [0, 1), got {self.label_dropout}"),
            (0.0 <= self.guidance < 1.0, f"guidance (MG ω, effective scale 1/(1 − ω)) must lie in [0, 1), "
                                         f"got {self.guidance}"),
            (self.guidance_t_min <= self.guidance_t_max,
             f"guidance_t_min {self.guidance_t_min} must not exceed guidance_t_max {self.guidance_t_max}"),
            (self.logvar_frequencies >= 1, f"logvar_frequencies must be ≥ 1, got {self.logvar_frequencies}"),
            (self.sampler in ("euler", "restart"), f"sampler must be 'euler' or 'restart', got {self.sampler!r}"),
        ]
        require(checks, "DMFConfig")


class LogVariance(nn.Module):
    """φ(t, s): (B,), (B,) → (B,) = Linear([cos, sin features of t; of s]), zero-initialised (φ = 0, unit
    weight at the start). Owned by the objective; not part of the backbone, so ``init_from`` leaves it."""

    def __init__(self, frequencies: int):
        super().__init__()
        self.frequencies = frequencies
        self.linear = nn.Linear(4 * frequencies, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor, s: Tensor) -> Tensor:
        dim = 2 * self.frequencies
        features = torch.cat([timestep_embedding(t, dim), timestep_embedding(s, dim)], dim=1)
        return self.linear(features.to(self.linear.weight.dtype)).squeeze(1)


def log_variance_loss(m: Tensor, phi: Tensor) -> Tensor:
    """ℓ = log(e^{−φ}·m + 1) + φ/2 per sample (m, φ: (B,)); minimised over φ at φ = log m."""
    return torch.log1p(torch.exp(-phi) * m) + phi / 2


@dataclass
class DMFTerms:
    """Both branches of one DMF loss (B = batch; images (B, C, H, W)).

    Attributes:
        t_f: (B,) flow-matching times; p_f: u(x_f, t_f, t_f) with graph; g_f: its target (no graph).
        t, s: (B,) MeanFlow times, s ≤ t; u: u(x_t, t, s) with graph; dudt: du/dt along (g, 1, 0),
            detached; g: the guided velocity at (x_t, t); u_tgt: g − (t − s)·du/dt (no graph).
        y: (B,) labels fed (null where dropped) or ``None``; dropped: (B,) bool.
        x_f, x_t: the two noisy inputs; v_f, v: their sample velocities ε − x.
    """

    t_f: Tensor
    x_f: Tensor
    v_f: Tensor
    p_f: Tensor
    g_f: Tensor
    t: Tensor
    s: Tensor
    x_t: Tensor
    v: Tensor
    g: Tensor
    u: Tensor
    dudt: Tensor
    u_tgt: Tensor
    y: Tensor | None
    dropped: Tensor


@objectives.register("dmf", summary="Decoupled MeanFlow: a flow-matching model split into t- and s-blocks, "
                                    "fine-tuned into a flow map (--init-from an fm run)")
class DMF(Objective):
    """Decoupled MeanFlow: split-conditioned flow map, flow-matching plus MeanFlow branches, model
    guidance and a learned log-variance weighting."""

    Config = DMFConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=True, teacher="stopgrad", cfg="distilled", time_mode="split",
                           renoise=True)
    progress_log = "loss_mf"   # ``loss`` includes the learned log-variance
    config: DMFConfig

    def __init__(self, backbone: nn.Module, config: DMFConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        super().__init__(backbone, config, num_classes, ema_betas)
        self.logvar = LogVariance(config.logvar_frequencies)

    # -- training -------------------------------------------------------------------------------
    def model_guidance(self, v: Tensor, x: Tensor, t: Tensor, y: Tensor | None, dropped: Tensor) -> Tensor:
        """g = v + ω·(u(x, t, t | y) − u(x, t, t | ∅)) where t ∈ [g_min, g_max] and the label was kept,
        v elsewhere; no gradient, eval mode, one pass on 2B. Several branches go in one call by
        concatenating them along the batch. v, x (B, C, H, W); t (B,); y (B,) original labels."""
        cfg = self.config
        if y is None or self.num_classes == 0 or cfg.guidance == 0.0:
            return v
        null = torch.full_like(y, self.num_classes)
        with torch.no_grad(), eval_mode(self.backbone):
            both = self.backbone(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]),
                                 y=torch.cat([y, null])).to(v.dtype)
        u_y, u_null = both.chunk(2)
        on = (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max) & ~dropped
        return torch.where(per_sample(on, v), v + cfg.guidance * (u_y - u_null), v)

    def terms(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None) -> DMFTerms:
        """Draw both branches' times and noise and the shared dropout; build the guided targets and run
        the JVP (see :class:`DMFTerms`).

        Randomness, in order: B uniforms (label dropout), B normals (t_f), x-shaped normals (ε_f),
        B + B normals (t₁, t₂), x-shaped normals (ε).
        """
        cfg, B, dev = self.config, x.shape[0], x.device
        dt = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dt)
        y_net, dropped = drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        dropped = dropped.to(dev)
        t_f = logit_normal(B, cfg.fm_t_mean, cfg.fm_t_std, generator, dev).to(dt)
        eps_f = randn(tuple(x.shape), generator, dev, dt)
        a = logit_normal(B, cfg.t_mean, cfg.t_std, generator, dev).to(dt)
        b = logit_normal(B, cfg.s_mean, cfg.s_std, generator, dev).to(dt)
        t, s = torch.maximum(a, b), torch.minimum(a, b)
        eps = randn(tuple(x.shape), generator, dev, dt)
        x_f = interpolate(x, eps_f, t_f)
        x_t = interpolate(x, eps, t)
        v_f, v = eps_f - x, eps - x
        guided = self.model_guidance(torch.cat([v_f, v]), torch.cat([x_f, x_t]), torch.cat([t_f, t]),
                                     None if y is None else torch.cat([y, y]), torch.cat([dropped, dropped]))
        g_f, g = (part.detach() for part in guided.chunk(2))

        p_f = self.backbone(x_f, t_f, t_f, y=y_net).to(dt)
        u, dudt = backbone_jvp(self.backbone, x_t, t, s, (g, torch.ones_like(t), None), y=y_net, detach_tangent=True)
        u, dudt = u.to(dt), dudt.to(dt)
        u_tgt = (g - per_sample(t - s, u) * dudt).detach()
        return DMFTerms(t_f=t_f, x_f=x_f, v_f=v_f, p_f=p_f, g_f=g_f, t=t, s=s, x_t=x_t, v=v, g=g, u=u, dudt=dudt,
                        u_tgt=u_tgt, y=y_net, dropped=dropped)

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """DMF loss ½(ℓ_FM + ℓ_MF) on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Logs: ``loss_fm`` and ``loss_mf`` (the unweighted m of each branch), ``logvar_fm`` and
        ``logvar_mf`` (mean φ), ``nonfinite``.
        """
        tm = self.terms(x, y, generator)
        m_f = mean_flat((tm.p_f - tm.g_f) ** 2)
        m = mean_flat((tm.u - tm.u_tgt) ** 2)
        phi_f = self.logvar(tm.t_f, tm.t_f).to(m.dtype)
        phi = self.logvar(tm.t, tm.s).to(m.dtype)
        per = 0.5 * (log_variance_loss(m_f, phi_f) + log_variance_loss(m, phi))
        with torch.no_grad():
            logs = {"loss_fm": m_f.mean(), "loss_mf": m.mean(), "logvar_fm": phi_f.mean(), "logvar_mf": phi.mean(),
                    "nonfinite": (~torch.isfinite(per)).sum().float()}
        return LossOutput(loss=per.mean(), per_sample=per.detach(), logs={k: v.detach() for k, v in logs.items()},
                          t=tm.t.detach())

    def flops_per_sample(self, forward_flops: float) -> float:
        """Flow-matching branch forward and backward (3 F), MeanFlow JVP with its primal (≈ 2 F) and the
        backward through the primal (≈ 2 F), and with model guidance two no-grad passes per branch
        (4 F): 11 F (7 F without guidance)."""
        guided = self.num_classes > 0 and self.config.guidance > 0
        return (11.0 if guided else 7.0) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """``euler``: x_s = x_t − (t − s)·u(x_t, t, s). ``restart``: x̂₀ = x_t − t·u(x_t, t, 0), then
        (1 − s)·x̂₀ + s·noise (x̂₀ where s = 0). x (B, C, H, W); t, s (B,)."""
        if cond.guidance is not None and bool((cond.guidance != 1).any()):
            raise ValueError(f"dmf bakes model guidance into training (effective scale "
                             f"{1 / (1 - self.config.guidance):g}); sample with guidance 1 or None")
        return flow_map_step(net if net is not None else self.backbone, x, t, s, cond.y, noise,
                             restart=self.config.sampler == "restart", who="restart sampling")
