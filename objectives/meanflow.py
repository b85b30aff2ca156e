"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, arXiv 2505.13447): one-step generation by average velocity.

With t = 1 noise: z_t = (1 − t)·x + t·ε, v = ε − x. The network predicts the *average* velocity over a
jump t → r ≤ t, u(z_t, t, r) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ, so z_r = z_t − (t − r)·u. Differentiating
(t − r)·u = ∫_r^t v dτ in t gives the MeanFlow identity (paper Eq. 6, docs/design/objectives.md §2.1)

    u(z_t, t, r) = v(z_t, t) − (t − r)·du/dt,        du/dt = v·∂_z u + ∂_t u   (∂_r u has tangent 0).

Training (§2.2): u and du/dt come from ONE forward-mode JVP of (z, t, r) ↦ u_θ(z, t, r | y) at
(z_t, t, r) with tangent (ṽ, 1, 0); the backbone is called as ``net(z, t, r, y=y)`` and builds the gap
t − r itself (DiT ``gap_embedder``), so the tangent on (t, gap) is (1, 1) automatically. The target is
u_tgt = sg(ṽ − (t − r)·du/dt); gradients flow through the primal u only. Per sample,
L = Σ_dims (u − u_tgt)² (a sum over C·H·W as in the paper) and loss = L / sg((L + c)^p) (adaptive
weight, p = 1, c = 0.01 on ImageNet).

Times (§2.3, JAX ``sample_tr``): t, r ~ logit-normal(−0.4, 1) independently, (t, r) ← (max, min),
then a fixed count round(0.75·B) of the batch (the first ones) gets r = t (flow-matching samples).

Guidance baked into training (§2.4, paper Eq. 21): the sample velocity is replaced by

    ṽ = ω·(ε − x) + κ·u_θ(z_t, t, t | y) + (1 − ω − κ)·u_θ(z_t, t, t | ∅)

for t ∈ [guidance_t_min, guidance_t_max] (ω = 1, κ = 0 outside); the two passes run under no-grad with
the online net in eval mode. The learned field is v_∅ + ω'·(v_y − v_∅) with ω' = ω/(1 − κ). Labels are
dropped to ∅ with probability ``label_dropout``; dropped samples use the unguided v.

Which samples are dropped (``label_dropout_samples``): ``mask`` (default) drops the samples the Bernoulli
mask picks, as the paper describes. The official JAX code draws the same mask but then drops the *first*
k samples of the batch, k = the mask's count (``cond_drop``); those are always among its first
round(0.75·B) samples, which have r = t, so its null-label model is trained only on the flow-matching
branch the guidance passes query (u(z_t, t, t | ∅)). ``first`` reproduces that. Either choice deviates
from one of the two sources (docs/design/meanflow-dropout.md).

Sampling (§2.5): z_s = z_t − (t − s)·u_θ(z_t, t, s), one evaluation per jump, schedule
linspace(1, 0, nfe + 1) (the base-class default). CFG at sampling must stay 1 (guidance is baked in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import (adaptive_weight, drop_labels, eval_mode, interpolate, jump, per_sample, randn,
                                       two_logit_normal_times)
from fewstep.objectives.jvp import backbone_jvp
from fewstep.registry import objectives


@dataclass(kw_only=True)
class MeanFlowConfig(ObjectiveConfig):
    """MeanFlow settings (defaults: the official JAX ImageNet config, ``configs/default.py``).

    Attributes:
        t_mean, t_std: logit-normal density of both raw times, σ(N(t_mean, t_std²)).
        r_equals_t_fraction: fraction of each batch trained with r = t (plain flow matching), in [0, 1];
            the count is round(fraction·B), half up.
        omega, kappa: training-time guidance ω, κ of ṽ (paper Eq. 21); effective scale ω/(1 − κ); κ < 1.
            ω = 1, κ = 0 switches guidance off (no extra passes).
        guidance_t_min, guidance_t_max: guidance is applied for t in this closed interval only.
        label_dropout: probability of training a sample with the null label (and unguided ṽ = v).
        label_dropout_samples: ``mask`` drops the samples a Bernoulli(label_dropout) mask picks (the paper);
            ``first`` drops the first k samples, k = that mask's count, as the released JAX code does (they
            all have r = t, see the module docstring). Same random draws either way.
        norm_p, norm_eps: adaptive weight 1/sg((L + c)^p), p = norm_p ≥ 0, c = norm_eps > 0.
    """

    name: str = "meanflow"
    t_mean: float = -0.4
    t_std: float = 1.0
    r_equals_t_fraction: float = 0.75
    omega: float = 1.0
    kappa: float = 0.5
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0
    label_dropout: float = 0.1
    label_dropout_samples: Literal["mask", "first"] = "mask"
    norm_p: float = 1.0
    norm_eps: float = 0.01

    def __post_init__(self) -> None:
        checks = [
            (self.t_std > 0, f"t_std must be > 0, got {self.t_std}"),
            (0.0 <= self.r_equals_t_fraction <= 1.0,
             f"r_equals_t_fraction must lie in [0, 1], got {self.r_equals_t_fraction}"),
            (self.kappa < 1.0, f"kappa must be < 1 (effective scale ω/(1 − κ)), got {self.kappa}"),
            (self.guidance_t_min <= self.guidance_t_max,
             f"guidance_t_min {self.guidance_t_min} must not exceed guidance_t_max {self.guidance_t_max}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must lie in [0, 1), got {self.label_dropout}"),
            (self.label_dropout_samples in ("mask", "first"),
             f"label_dropout_samples must be 'mask' or 'first', got {self.label_dropout_samples!r}"),
            (self.norm_p >= 0, f"norm_p must be ≥ 0, got {self.norm_p}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
        ]
        require(checks, "MeanFlowConfig")

    @property
    def effective_guidance(self) -> float:
        """ω' = ω/(1 − κ): the CFG scale of the field the model learns."""
        return self.omega / (1.0 - self.kappa)


@dataclass
class MeanFlowTerms:
    """Everything one MeanFlow loss is built from (B = batch; images (B, C, H, W)).

    Attributes:
        t, r: (B,) times in (0, 1), r ≤ t, in x's dtype.
        z_t: noisy inputs (1 − t)·x + t·ε.
        v: sample velocity ε − x.
        v_tilde: the JVP tangent and target velocity ṽ (guided, or v where guidance is off/dropped).
        y: (B,) labels given to the network (null = num_classes where dropped), or ``None``.
        dropped: (B,) bool, labels dropped to null.
        u: u_θ(z_t, t, r | y), with its autograd graph.
        dudt: du/dt along (ṽ, 1, 0), detached.
        u_tgt: sg(ṽ − (t − r)·du/dt).
    """

    t: Tensor
    r: Tensor
    z_t: Tensor
    v: Tensor
    v_tilde: Tensor
    y: Tensor | None
    dropped: Tensor
    u: Tensor
    dudt: Tensor
    u_tgt: Tensor


@objectives.register("meanflow", summary="MeanFlow: average velocity u(z,t,r), JVP target, CFG baked in")
class MeanFlow(Objective):
    """MeanFlow with logit-normal (t, r), a fixed r = t fraction, adaptive weights and training-time CFG."""

    Config = MeanFlowConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=True, teacher="stopgrad", cfg="distilled", guidance_input=False)
    progress_log = "loss_u"   # the adaptive weight normalises ``loss`` to ≈ 1
    config: MeanFlowConfig

    # -- training -------------------------------------------------------------------------------
    def sample_times(self, n: int, generator: torch.Generator | None, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(t, r), each (n,) in (0, 1) with r ≤ t; the first round(fraction·n) samples have r = t.

        Randomness, in order: n normals (t), n normals (r) from ``generator``.
        """
        cfg = self.config
        return two_logit_normal_times(n, cfg.t_mean, cfg.t_std, cfg.r_equals_t_fraction, generator, device, dtype)

    def guided_velocity(self, v: Tensor, z_t: Tensor, t: Tensor, y: Tensor | None, dropped: Tensor) -> Tensor:
        """ṽ = ω·v + κ·u(z_t, t, t | y) + (1 − ω − κ)·u(z_t, t, t | ∅) where t is in the guidance interval
        and the label was kept; v elsewhere. The guidance passes run under no-grad in eval mode.

        Args:
            v: (B, C, H, W) sample velocity ε − x; z_t likewise; t (B,); y (B,) original labels or None;
            dropped: (B,) bool labels dropped to null (these get v).
        """
        cfg = self.config
        if y is None or self.num_classes == 0 or (cfg.omega == 1.0 and cfg.kappa == 0.0):
            return v
        c_null = 1.0 - cfg.omega - cfg.kappa
        null = torch.full_like(y, self.num_classes)
        labels = ([y] if cfg.kappa != 0.0 else []) + ([null] if c_null != 0.0 else [])   # ≥ 1 (ω, κ ≠ 1, 0)
        n = len(labels)
        with torch.no_grad(), eval_mode(self.backbone):
            out = self.backbone(torch.cat([z_t] * n), torch.cat([t] * n), torch.cat([t] * n), y=torch.cat(labels))
        passes = list(out.to(v.dtype).chunk(n))
        guided = cfg.omega * v
        if cfg.kappa != 0.0:
            guided = guided + cfg.kappa * passes.pop(0)
        if c_null != 0.0:
            guided = guided + c_null * passes.pop(0)
        return torch.where(per_sample(self._guided(t, dropped), v), guided, v)

    def _guided(self, t: Tensor, dropped: Tensor) -> Tensor:
        """(B,) bool: guidance applies (t in the interval, label kept)."""
        cfg = self.config
        return (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max) & ~dropped.to(t.device)

    def terms(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None) -> MeanFlowTerms:
        """Draw (t, r), ε and label dropout, build ṽ and run the JVP (see :class:`MeanFlowTerms`).

        Randomness, in order: 2·B normals (times), x-shaped normals (ε), B uniforms (label dropout).
        """
        cfg = self.config
        t, r = self.sample_times(x.shape[0], generator, x.device, x.dtype)
        eps = randn(tuple(x.shape), generator, x.device, x.dtype)
        z_t = interpolate(x, eps, t)
        v = eps - x
        y_net, dropped = drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        if cfg.label_dropout_samples == "first" and y is not None and self.num_classes > 0:
            dropped = torch.arange(y.shape[0], device=dropped.device) < dropped.sum()   # JAX cond_drop
            y_net = torch.where(dropped.to(y.device), torch.full_like(y, self.num_classes), y)
        v_tilde = self.guided_velocity(v, z_t, t, y, dropped).to(z_t.dtype).detach()

        u, dudt = backbone_jvp(self.backbone, z_t, t, r, (v_tilde, torch.ones_like(t), None), y=y_net,
                               detach_tangent=True)
        acc = torch.promote_types(u.dtype, torch.float32)
        u_tgt = (v_tilde.to(acc) - per_sample(t - r, u).to(acc) * dudt.to(acc)).detach()
        return MeanFlowTerms(t=t, r=r, z_t=z_t, v=v, v_tilde=v_tilde, y=y_net, dropped=dropped.to(x.device),
                             u=u, dudt=dudt, u_tgt=u_tgt)

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Adaptive-weighted MeanFlow loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Logs: ``loss_u`` (unweighted ‖u − u_tgt‖² per dimension), ``v_loss`` (‖u − v‖² summed over
        dimensions, monitoring only), ``weight`` (mean adaptive weight), ``frac_r_neq_t``, ``nonfinite``
        (samples with a non-finite L). ``loss`` itself (the weighted mean) is ``LossOutput.loss``.
        """
        cfg = self.config
        terms = self.terms(x, y, generator)
        u = terms.u.to(terms.u_tgt.dtype)
        L = ((u - terms.u_tgt) ** 2).flatten(1).sum(dim=1)                    # (B,) sum over C·H·W
        weight = adaptive_weight(L, cfg.norm_p, cfg.norm_eps)
        loss = L * weight
        with torch.no_grad():
            dims = u[0].numel()
            logs = {"loss_u": L.mean() / dims,
                    "v_loss": ((u - terms.v.to(u.dtype)) ** 2).flatten(1).sum(dim=1).mean(),
                    "weight": weight.mean(),
                    "frac_r_neq_t": (terms.r != terms.t).float().mean(),
                    "nonfinite": (~torch.isfinite(L)).sum().float()}
        return LossOutput(loss=loss.mean(), per_sample=loss.detach(), logs={k: v.detach() for k, v in logs.items()})

    def flops_per_sample(self, forward_flops: float) -> float:
        """JVP forward ≈ 2 F (primal + tangent), backward through the primal only ≈ 2 F, plus one no-grad
        forward (1 F) per guidance pass: u(·|y) when κ ≠ 0 and u(·|∅) when 1 − ω − κ ≠ 0 (both run on the
        whole batch). Defaults (ω = 1, κ = 0.5): 6 F; without guidance: 4 F."""
        cfg = self.config
        passes = 0
        if not (cfg.omega == 1.0 and cfg.kappa == 0.0) and self.num_classes > 0:
            passes = int(cfg.kappa != 0.0) + int(1.0 - cfg.omega - cfg.kappa != 0.0)
        return (4.0 + passes) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One jump z_s = z_t − (t − s)·u_θ(z_t, t, s | y); t, s (B,) with s ≤ t."""
        if cond.guidance is not None and bool((cond.guidance != 1).any()):
            raise ValueError(f"meanflow bakes guidance into training (effective scale "
                             f"{self.config.effective_guidance:g}); sample with guidance 1 or None")
        net = net if net is not None else self.backbone
        return jump(x, t, s, net(x, t.to(x.dtype), s.to(x.dtype), y=cond.y))
