"""α-Flow (Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu & Skorokhodov 2025, arXiv 2510.20771);
docs/design/frontier.md §4. Written from the paper and that restatement (the official code's licence is
non-commercial; nothing here is taken from it).

With t = 1 noise: x_t = (1 − t)·x + t·ε, v = ε − x; the network u_θ(x_t, t, s) is the average velocity
of the jump t → s and embeds both absolute times (``time_mode="t+s"``). One family of targets, indexed by
α ∈ [0, 1] (h = t − s, τ = t − α·h, ṽ the shift velocity, u⁻ = the current net without gradient):

    u_tgt = α·ṽ + (1 − α)·u⁻(x_t − α·h·ṽ, τ → s)                     (0 < α ≤ 1; no JVP),
    u_tgt = ṽ − h·du/dt,  du/dt along (ṽ, 1, 0)                       (α = 0: MeanFlow, one JVP).

α = 1 regresses u on ṽ for every s ("trajectory flow matching"; the extra forward is skipped); α → 0 is
MeanFlow's gradient. Training follows a curriculum α: 1 → 0 in images (§4.2):
α = 1 − σ(γ·(p − ½)), p = (kimg − start)/(end − start), 1 before the start and 0 after the end,
snapped to exactly 1 above 1 − η and to 0 below η (η = 0.005): the step is pure trajectory flow matching
early (no JVP, no extra forward) and pure MeanFlow late (the JVP turns on). α is one number per
optimizer step, read from the images seen (``nimg``), so it resumes exactly.

Batch (§4.3): the first round(fm_fraction·B) samples are flow matching (s = t, target ṽ); the rest draw
two logit-normal times, t = max, s = min. Loss per sample: L = mean_CHW (u − sg u_tgt)², weighted by
1/(sg L + c) for flow-matching and α = 0 samples and α/(sg L + c) for 0 < α ≤ 1.

CFG (§4.4), as MeanFlow's with a strict interval: inside t_min < t < t_max labels are dropped with
probability p and ṽ = ω(ε − x) + κ·u⁻(x_t, t, t | y) + (1 − ω − κ)·u⁻(x_t, t, t | ∅) (y already null for
dropped samples); outside, ṽ = ε − x and labels are kept. Effective scale ω/(1 − κ); sampling uses none.

Samplers (§4.5): ``trajectory``: x_s = x_t − (t − s)·u(x_t, t, s); ``consistency``: jump to the data
end, x̂₀ = x_t − t·u(x_t, t, 0), and re-noise to s with fresh noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import (eval_mode, flow_map_step, interpolate, logit_normal, mean_flat, per_sample,
                                       rand, randn)
from fewstep.objectives.jvp import backbone_jvp
from fewstep.registry import objectives


@dataclass(kw_only=True)
class AlphaFlowConfig(ObjectiveConfig):
    """α-Flow settings (defaults: the B/2-cfg ImageNet run, 1.2 M steps at batch 256; frontier.md §4.6).

    Attributes:
        t_mean, t_std: logit-normal law of the flow-matching time and of both two-time draws
            (−0.4, 1.0 [unverified: quoted third-hand from the official config]).
        fm_fraction: share of each batch (the first samples) trained with s = t.
        alpha_start_kimg, alpha_end_kimg: the sigmoid curriculum α: 1 → 0 runs between these (kimg);
            α = 0 from the start when both are 0 (plain MeanFlow with these settings).
        alpha_gamma: steepness γ of the sigmoid (25).
        alpha_snap: η; α < η becomes 0 and α > 1 − η becomes 1.
        alpha_constant: a fixed α in [0, 1] instead of the curriculum (ablations, tests); ``None``: the curriculum.
        omega, kappa: training guidance ω, κ of ṽ; effective scale ω/(1 − κ); ω = 1, κ = 0 is off.
        guidance_t_min, guidance_t_max: guidance (and label dropout) applies for t strictly inside.
        label_dropout: probability of the null label inside the guidance interval.
        clamp_utgt: clip u_tgt element-wise to ±clamp_utgt (4.0 in the XL runs), ``None``: no clip.
        norm_eps: c of the weight 1/(sg L + c) (10⁻³ [unverified]).
        sampler: ``trajectory`` (flow-map jumps) or ``consistency`` (jump to the data end and re-noise).
        two_step_mid: the intermediate time of the 2-step schedule [1, mid, 0] (XL/2-cfg: 0.55).
    """

    name: str = "alphaflow"
    t_mean: float = -0.4
    t_std: float = 1.0
    fm_fraction: float = 0.25
    alpha_start_kimg: float = 0.0
    alpha_end_kimg: float = 307_200.0
    alpha_gamma: float = 25.0
    alpha_snap: float = 0.005
    alpha_constant: float | None = None
    omega: float = 1.0
    kappa: float = 0.5
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0
    label_dropout: float = 0.1
    clamp_utgt: float | None = None
    norm_eps: float = 1e-3
    sampler: Literal["trajectory", "consistency"] = "trajectory"
    two_step_mid: float = 0.5

    def __post_init__(self) -> None:
        checks = [
            (self.t_std > 0, f"t_std must be > 0, got {self.t_std}"),
            (0.0 <= self.fm_fraction <= 1.0, f"fm_fraction must lie in [0, 1], got {self.fm_fraction}"),
            (0.0 <= self.alpha_start_kimg <= self.alpha_end_kimg,
             f"need 0 ≤ alpha_start_kimg ≤ alpha_end_kimg, got {self.alpha_start_kimg}, {self.alpha_end_kimg}"),
            (self.alpha_gamma > 0, f"alpha_gamma must be > 0, got {self.alpha_gamma}"),
            (0.0 <= self.alpha_snap < 0.5, f"alpha_snap must lie in [0, 0.5), got {self.alpha_snap}"),
            (self.alpha_constant is None or 0.0 <= self.alpha_constant <= 1.0,
             f"alpha_constant must lie in [0, 1] (or none), got {self.alpha_constant}"),
            (self.kappa < 1.0, f"kappa must be < 1 (effective scale ω/(1 − κ)), got {self.kappa}"),
            (self.guidance_t_min <= self.guidance_t_max,
             f"guidance_t_min {self.guidance_t_min} must not exceed guidance_t_max {self.guidance_t_max}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must lie in [0, 1), got {self.label_dropout}"),
            (self.clamp_utgt is None or self.clamp_utgt > 0, f"clamp_utgt must be > 0 (or none), got {self.clamp_utgt}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (self.sampler in ("trajectory", "consistency"),
             f"sampler must be 'trajectory' or 'consistency', got {self.sampler!r}"),
            (0.0 < self.two_step_mid < 1.0, f"two_step_mid must lie in (0, 1), got {self.two_step_mid}"),
        ]
        require(checks, "AlphaFlowConfig")


def alpha_schedule(kimg: float, start: float, end: float, gamma: float = 25.0, snap: float = 0.005) -> float:
    """α(kimg) of the sigmoid curriculum (module docstring): 1 before ``start``, 0 from ``end`` on,
    1 − σ(γ·(p − ½)) in between with p = (kimg − start)/(end − start), then snapped to 0 below ``snap``
    and to 1 above 1 − ``snap``."""
    if kimg >= end:
        return 0.0
    if kimg < start:
        return 1.0
    p = (kimg - start) / (end - start)
    alpha = 1.0 - 1.0 / (1.0 + math.exp(-gamma * (p - 0.5)))
    return 0.0 if alpha < snap else 1.0 if alpha > 1.0 - snap else alpha


@dataclass
class AlphaFlowTerms:
    """What one α-Flow loss is built from (B = batch; images (B, C, H, W)).

    Attributes:
        alpha: the step's α. t, s: (B,) times, s = t on the first ``fm_fraction`` of the batch.
        x_t: noisy inputs; v: ε − x; v_tilde: the shift velocity ṽ (guided where it applies; no graph).
        y: (B,) labels fed (null where dropped) or ``None``; dropped: (B,) bool.
        u: u_θ(x_t, t, s) with graph; u_tgt: the target (no graph); weight: (B,) α or 1 per sample
            (before the 1/(sg L + c) normalisation).
    """

    alpha: float
    t: Tensor
    s: Tensor
    x_t: Tensor
    v: Tensor
    v_tilde: Tensor
    y: Tensor | None
    dropped: Tensor
    u: Tensor
    u_tgt: Tensor
    weight: Tensor


@objectives.register("alphaflow", summary="α-Flow: curriculum from trajectory flow matching (α=1) to MeanFlow "
                                          "(α=0), JVP only at α=0, CFG baked in")
class AlphaFlow(Objective):
    """α-Flow: the α-family of average-velocity targets with a sigmoid α curriculum 1 → 0 in images."""

    Config = AlphaFlowConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=True, teacher="stopgrad", cfg="distilled", time_mode="t+s",
                           renoise=True)
    progress_log = "loss_u"   # the weights normalise ``loss`` to ≈ 1
    config: AlphaFlowConfig

    def alpha(self, nimg: int) -> float:
        """α for a step that starts after ``nimg`` training images (the curriculum, or ``alpha_constant``)."""
        cfg = self.config
        if cfg.alpha_constant is not None:
            return float(cfg.alpha_constant)
        return alpha_schedule(nimg / 1000, cfg.alpha_start_kimg, cfg.alpha_end_kimg, cfg.alpha_gamma, cfg.alpha_snap)

    # -- training -------------------------------------------------------------------------------
    def sample_times(self, n: int, generator: torch.Generator | None, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(t, s), each (n,): the first round(fm_fraction·n) samples have s = t ~ logit-normal, the rest
        t = max and s = min of two logit-normal draws. Randomness: 3·n normals."""
        cfg = self.config
        fm = logit_normal(n, cfg.t_mean, cfg.t_std, generator, device).to(dtype)
        a = logit_normal(n, cfg.t_mean, cfg.t_std, generator, device).to(dtype)
        b = logit_normal(n, cfg.t_mean, cfg.t_std, generator, device).to(dtype)
        first = torch.arange(n, device=device) < int(cfg.fm_fraction * n + 0.5)
        return torch.where(first, fm, torch.maximum(a, b)), torch.where(first, fm, torch.minimum(a, b))

    def net_u(self, x: Tensor, t: Tensor, s: Tensor, y: Tensor | None) -> Tensor:
        """u⁻(x, t, s | y): the online net without gradient, in eval mode, in x's dtype."""
        with torch.no_grad(), eval_mode(self.backbone):
            return self.backbone(x, t, s, y=y).to(x.dtype)

    def shift_velocity(self, v: Tensor, x_t: Tensor, t: Tensor, y: Tensor | None,
                       generator: torch.Generator | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """(ṽ, labels fed, dropped): label dropout inside the strict guidance interval, then the guided
        ṽ there and v outside (module docstring). One no-grad pass on 2B (κ u⁻(·|y), (1−ω−κ) u⁻(·|∅))
        when guidance is on. Randomness: B uniforms (dropout)."""
        cfg, B = self.config, v.shape[0]
        inside = (t > cfg.guidance_t_min) & (t < cfg.guidance_t_max)
        if y is None or self.num_classes == 0:
            return v, y, torch.zeros(B, dtype=torch.bool, device=v.device)
        dropped = inside & (rand(B, generator, v.device) < cfg.label_dropout)
        y_net = torch.where(dropped, torch.full_like(y, self.num_classes), y)
        if cfg.omega == 1.0 and cfg.kappa == 0.0:
            return v, y_net, dropped
        null = torch.full_like(y, self.num_classes)
        both = self.net_u(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y_net, null]))
        u_y, u_null = both.chunk(2)
        guided = cfg.omega * v + cfg.kappa * u_y + (1.0 - cfg.omega - cfg.kappa) * u_null
        return torch.where(per_sample(inside, v), guided, v), y_net, dropped

    def target(self, x_t: Tensor, t: Tensor, s: Tensor, v_tilde: Tensor, y: Tensor | None,
               alpha: float) -> tuple[Tensor, Tensor]:
        """(u, u_tgt) for a given shift velocity ṽ and α (the deterministic core of :meth:`terms`):
        u = u_θ(x_t, t, s) with graph; u_tgt without graph, clipped to ±clamp_utgt when set.

        α = 0: one JVP along (ṽ, 1, 0), u_tgt = ṽ − (t − s)·du/dt. 0 < α < 1: a plain forward for u and
        u_tgt = α·ṽ + (1 − α)·u⁻(x_t − α(t − s)·ṽ, t − α(t − s), s). α = 1: u_tgt = ṽ. Samples with s = t
        get ṽ in every case. x_t, ṽ (B, C, H, W); t, s (B,).
        """
        h = per_sample(t - s, x_t)
        if alpha == 0.0:
            u, dudt = backbone_jvp(self.backbone, x_t, t, s, (v_tilde, torch.ones_like(t), None), y=y,
                                   detach_tangent=True)
            u = u.to(x_t.dtype)
            u_tgt = v_tilde - h * dudt.to(x_t.dtype)
        else:
            u = self.backbone(x_t, t, s, y=y).to(x_t.dtype)
            u_tgt = v_tilde
            if alpha < 1.0:
                tau = t - alpha * (t - s)
                u_tgt = alpha * v_tilde + (1.0 - alpha) * self.net_u(x_t - alpha * h * v_tilde, tau, s, y)
        u_tgt = torch.where(per_sample(s == t, u_tgt), v_tilde, u_tgt)
        if self.config.clamp_utgt is not None:
            u_tgt = u_tgt.clamp(-self.config.clamp_utgt, self.config.clamp_utgt)
        return u, u_tgt.detach()

    def terms(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
              nimg: int = 0) -> AlphaFlowTerms:
        """Draw times, noise and dropout, build ṽ and the α-target (see :class:`AlphaFlowTerms`).

        Randomness, in order: 3·B normals (times), x-shaped normals (ε), B uniforms (label dropout).
        """
        dt = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dt)
        alpha = self.alpha(nimg)
        t, s = self.sample_times(x.shape[0], generator, x.device, dt)
        eps = randn(tuple(x.shape), generator, x.device, dt)
        x_t = interpolate(x, eps, t)
        v = eps - x
        v_tilde, y_net, dropped = self.shift_velocity(v, x_t, t, y, generator)
        v_tilde = v_tilde.detach()
        u, u_tgt = self.target(x_t, t, s, v_tilde, y_net, alpha)
        jump = s < t
        weight = torch.where(jump, torch.full_like(t, alpha if alpha > 0 else 1.0), torch.ones_like(t))
        return AlphaFlowTerms(alpha=alpha, t=t, s=s, x_t=x_t, v=v, v_tilde=v_tilde, y=y_net, dropped=dropped,
                              u=u, u_tgt=u_tgt, weight=weight)

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """α-Flow loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``; α from ``nimg``.

        Logs: ``alpha``, ``loss_u`` (unweighted mean (u − u_tgt)²), ``loss_tfm`` (mean (u − ṽ)² of the
        two-time samples) and ``loss_tc`` (mean 2(ṽ − u_tgt)·u of the same; the paper's decomposition
        L_MF = L_TFM + L_TC + const), ``weight`` (mean weight), ``nonfinite``.
        """
        cfg = self.config
        tm = self.terms(x, y, generator, nimg)
        L = mean_flat((tm.u - tm.u_tgt) ** 2)
        weight = tm.weight / (L.detach() + cfg.norm_eps)
        per = weight * L
        jump = (tm.s < tm.t).to(L.dtype)
        n_jump = jump.sum().clamp(min=1)
        with torch.no_grad():
            logs = {"alpha": torch.tensor(tm.alpha), "loss_u": L.mean(), "weight": weight.mean(),
                    "loss_tfm": (mean_flat((tm.u - tm.v_tilde) ** 2) * jump).sum() / n_jump,
                    "loss_tc": (mean_flat(2 * (tm.v_tilde - tm.u_tgt) * tm.u) * jump).sum() / n_jump,
                    "nonfinite": (~torch.isfinite(per)).sum().float()}
        return LossOutput(loss=per.mean(), per_sample=per.detach(), logs={k: v.detach() for k, v in logs.items()},
                          t=tm.t.detach())

    def flops_per_sample(self, forward_flops: float) -> float:
        """In the final (α = 0) phase: the JVP (≈ 2 F) and the backward through its primal (≈ 2 F), plus
        one no-grad pass per guidance term on the whole batch (u⁻(·|y) when κ ≠ 0, u⁻(·|∅) when
        1 − ω − κ ≠ 0): 6 F with the defaults. Earlier phases cost less (3 F at α = 1, about
        (4 − fm_fraction) F in between, plus the guidance passes)."""
        cfg = self.config
        passes = 0
        if self.num_classes > 0 and not (cfg.omega == 1.0 and cfg.kappa == 0.0):
            passes = 2
        return (4.0 + passes) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def default_schedule(self, nfe: int) -> list[float]:
        """Uniform times from 1 to 0, except [1, two_step_mid, 0] for two jumps."""
        return [1.0, self.config.two_step_mid, 0.0] if nfe == 2 else super().default_schedule(nfe)

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """``trajectory``: x_s = x_t − (t − s)·u(x_t, t, s). ``consistency``: x̂₀ = x_t − t·u(x_t, t, 0),
        then (1 − s)·x̂₀ + s·noise (x̂₀ where s = 0). x (B, C, H, W); t, s (B,)."""
        if cond.guidance is not None and bool((cond.guidance != 1).any()):
            raise ValueError(f"alphaflow bakes guidance into training (effective scale "
                             f"{self.config.omega / (1 - self.config.kappa):g}); sample with guidance 1 or None")
        return flow_map_step(net if net is not None else self.backbone, x, t, s, cond.y, noise,
                             restart=self.config.sampler == "consistency", who="consistency sampling")
