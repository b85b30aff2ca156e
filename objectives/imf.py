"""Improved MeanFlow, iMF (Geng, Lu, Wu, Shechtman, Kolter & He 2025, arXiv 2512.02012); docs/design/frontier.md §3.

With t = 1 noise: x_t = (1 − t)·x + t·ε, v = ε − x. As in MeanFlow the network u_θ(x_t, t, s) is the
average velocity of the jump t → s (x_s = x_t − (t − s)·u), but the loss is on the *implied
instantaneous velocity* (paper §3, the "boundary/velocity reformulation")

    V = u + (t − s)·sg(du/dt),        du/dt = v̂·∂_x u + ∂_t u      (one JVP, tangent (v̂, 1, 0) on (x, t, s)),

regressed on the (guided) velocity target v_g. The JVP tangent v̂ is the network's own velocity
estimate, not ε − x: an auxiliary v-head sharing the trunk (``v_source="aux_head"``, trained with its
own loss ‖v − v_g‖²) or u itself at s = t (``"boundary"``, the zero-parameter variant). Then V depends
on x_t alone and training is a plain regression (§3.1).

Guidance is a network input (§3.2): each sample draws ω from the density ∝ ω^(−β) on [1, ω_max]
(log-uniform for β = 1) and a guidance interval [t_min, t_max], t_min ~ U[0, ½], t_max ~ U[½, 1]; the
backbone embeds 1 − 1/ω, t_min and t_max (extra scalar conditions) and only the gap h = t − s of the times
(``time_mode="h"``). Samples with s = t (the first round(½B), the official "first-k" layout) train the
interval [0, 1]. With ω_eff = ω inside the interval and 1 outside,

    v_g = (ε − x) + (1 − 1/ω_eff)·(v̂_c − v̂_u),
    v̂_c = v̂(x_t; h = 0, ω_eff, [0, 1], y),   v̂_u = v̂(x_t; h = 0, ω = 1, [0, 1], ∅)   (no gradient),

whose fixed point is the guided field v_u + ω_eff·(v_c − v_u) (the factor 1 − 1/ω undoes the guidance
already in v̂_c). The first Binomial(B, p) samples get the null label and v_g = ε − x. The u-branch
sees the raw ω and the sampled interval. Loss per sample, each term with MeanFlow's adaptive weight
(p = 1, c = 0.01; sums over C·H·W):  w(L_u) + w(L_v),  L_u = ‖V − v_g‖², L_v = ‖v − v_g‖².

Sampling (§3.3): x_s = x_t − (t − s)·u(x_t, t, s; ω, [t_min, t_max], y), one evaluation per jump, no
v-head, ω and the interval from ``guidance``/``guidance_t_min``/``guidance_t_max`` (the paper's B/2
setting 8.0, [0.40, 0.65]) or per sample from the sampler's guidance.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import (adaptive_weight, eval_mode, interpolate, jump, per_sample, rand, randn,
                                       two_logit_normal_times)
from fewstep.objectives.jvp import backbone_jvp
from fewstep.registry import objectives

CONDITIONS = ("omega", "t_min", "t_max")
"""The backbone's extra scalar inputs: 1 − 1/ω ∈ [0, 1), t_min and t_max (docs/design/frontier.md §3.2)."""


@dataclass(kw_only=True)
class IMFConfig(ObjectiveConfig):
    """iMF settings (defaults: the released B/2 config, ``configs/train_config.yml``; frontier.md §3.4).

    Attributes:
        t_mean, t_std: logit-normal density of both raw times; t = max, s = min.
        r_equals_t_fraction: fraction of each batch (the first ones) trained with s = t, in [0, 1].
        omega_max: ω is drawn on [1, omega_max] (1 + s_max; 8 in the paper).
        omega_beta: ω has density ∝ ω^(−omega_beta) (1: log-uniform).
        interval_min_range, interval_max_range: t_min ~ U(interval_min_range), t_max ~ U(interval_max_range).
        label_dropout: probability of the null label (and the unguided target ε − x).
        v_source: ``aux_head`` (a v-head on the shared trunk, its own loss) or ``boundary`` (v̂ = u at s = t).
        norm_p, norm_eps: adaptive weight 1/sg((L + c)^p).
        guidance: ω at sampling (the sampler's guidance overrides it per call).
        guidance_t_min, guidance_t_max: the guidance interval fed at sampling.
    """

    name: str = "imf"
    t_mean: float = -0.4
    t_std: float = 1.0
    r_equals_t_fraction: float = 0.5
    omega_max: float = 8.0
    omega_beta: float = 1.0
    interval_min_range: tuple[float, float] = (0.0, 0.5)
    interval_max_range: tuple[float, float] = (0.5, 1.0)
    label_dropout: float = 0.1
    v_source: Literal["aux_head", "boundary"] = "aux_head"
    norm_p: float = 1.0
    norm_eps: float = 0.01
    guidance: float = 8.0
    guidance_t_min: float = 0.4
    guidance_t_max: float = 0.65

    def __post_init__(self) -> None:
        lo, hi = self.interval_min_range, self.interval_max_range
        checks = [
            (self.t_std > 0, f"t_std must be > 0, got {self.t_std}"),
            (0.0 <= self.r_equals_t_fraction <= 1.0,
             f"r_equals_t_fraction must lie in [0, 1], got {self.r_equals_t_fraction}"),
            (self.omega_max >= 1.0, f"omega_max must be ≥ 1, got {self.omega_max}"),
            (0.0 <= lo[0] <= lo[1] <= 1.0 and 0.0 <= hi[0] <= hi[1] <= 1.0,
             f"interval ranges must be ordered pairs in [0, 1], got {lo} and {hi}"),
            (0.0 <= self.label_dropout < 1.0, f"label_dropout must lie in [0, 1), got {self.label_dropout}"),
            (self.v_source in ("aux_head", "boundary"), f"v_source must be 'aux_head' or 'boundary', got {self.v_source!r}"),
            (self.norm_p >= 0 and self.norm_eps > 0, f"need norm_p ≥ 0 and norm_eps > 0, got {self.norm_p}, {self.norm_eps}"),
            (self.guidance >= 1.0, f"guidance (ω at sampling) must be ≥ 1, got {self.guidance}"),
            (0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0,
             f"need 0 ≤ guidance_t_min ≤ guidance_t_max ≤ 1, got {self.guidance_t_min}, {self.guidance_t_max}"),
        ]
        require(checks, "IMFConfig")


@dataclass
class IMFTerms:
    """What one iMF loss is built from (B = batch; images (B, C, H, W)).

    Attributes:
        t, s: (B,) times, s ≤ t. omega: (B,) sampled ω ≥ 1; t_min, t_max: (B,) the interval fed to u.
        omega_eff: (B,) ω inside [t_min, t_max], 1 outside. dropped: (B,) bool null labels.
        x_t: noisy inputs; v: ε − x; v_hat: the tangent v̂ (no graph); v_g: the target (no graph).
        u: u_θ(x_t, t, s) with graph; dudt: du/dt along (v̂, 1, 0), detached; V: u + (t − s)·dudt.
        v_aux: the v-head's output at (t, s) with graph (``None`` for ``boundary``).
    """

    t: Tensor
    s: Tensor
    omega: Tensor
    t_min: Tensor
    t_max: Tensor
    omega_eff: Tensor
    dropped: Tensor
    x_t: Tensor
    v: Tensor
    v_hat: Tensor
    v_g: Tensor
    u: Tensor
    dudt: Tensor
    V: Tensor
    v_aux: Tensor | None


def omega_condition(omega: Tensor) -> Tensor:
    """The value the backbone embeds for a guidance scale ω ≥ 1: 1 − 1/ω ∈ [0, 1) (iMF's ω token)."""
    return 1.0 - 1.0 / omega


@objectives.register("imf", summary="improved MeanFlow: velocity loss on u + (t−s)·du/dt, own v̂ tangent, "
                                    "guidance ω and interval as inputs")
class IMF(Objective):
    """iMF: average velocity u(x, t, s; ω, interval) trained through its implied velocity V, JVP tangent
    from an auxiliary v-head (or the boundary u(x, t, t)), guidance scale and interval as network inputs."""

    Config = IMFConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=True, teacher="stopgrad", cfg="distilled", time_mode="h",
                           conditions=CONDITIONS, aux_head=True)
    progress_log = "loss_u"   # the adaptive weight normalises ``loss`` to ≈ 2
    config: IMFConfig

    @classmethod
    def needs_for(cls, config: IMFConfig) -> ObjectiveNeeds:
        """No auxiliary head with ``v_source="boundary"``."""
        return dataclasses.replace(cls.needs, aux_head=config.v_source == "aux_head")

    # -- training -------------------------------------------------------------------------------
    def sample_guidance(self, t: Tensor, s: Tensor, generator: torch.Generator | None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """(ω, t_min, t_max), each (B,) in t's dtype: the interval U(interval ranges), forced to [0, 1]
        where s = t; ω with density ∝ ω^(−β) on [1, ω_max] by inverse CDF (β = 1: ω_max^U).

        Randomness, in order: B uniforms (t_min), B uniforms (t_max), B uniforms (ω).
        """
        cfg, n, dev, dt = self.config, t.shape[0], t.device, t.dtype
        (a0, a1), (b0, b1) = cfg.interval_min_range, cfg.interval_max_range
        t_min = a0 + (a1 - a0) * rand(n, generator, dev).to(dt)
        t_max = b0 + (b1 - b0) * rand(n, generator, dev).to(dt)
        equal = s == t
        t_min, t_max = torch.where(equal, 0.0, t_min), torch.where(equal, 1.0, t_max)
        u = rand(n, generator, dev).to(dt)
        if cfg.omega_beta == 1.0:
            omega = cfg.omega_max ** u
        else:
            e = 1.0 - cfg.omega_beta
            omega = (1.0 + u * (cfg.omega_max ** e - 1.0)) ** (1.0 / e)
        if self.num_classes == 0:   # nothing to guide: ω = 1
            omega = torch.ones_like(omega)
        return omega, t_min, t_max

    def first_k_dropped(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n,) bool: the first k samples, k ~ Binomial(n, label_dropout) (the official layout: with
        s = t on the first half, dropped labels fall in the s = t block). One draw of n uniforms."""
        k = int((rand(n, generator, device) < self.config.label_dropout).sum())
        dropped = torch.arange(n, device=device) < k
        return dropped if self.num_classes > 0 else torch.zeros_like(dropped)

    def velocity_estimates(self, x_t: Tensor, t: Tensor, y: Tensor | None, omega_eff: Tensor,
                           guided: bool) -> tuple[Tensor, Tensor | None]:
        """(v̂_c, v̂_u) without gradient, in eval mode: the v-head (or u at s = t for ``boundary``) at
        h = 0 and interval [0, 1], with (y, ω_eff) and (∅, ω = 1); one pass on 2B (B when not ``guided``:
        v̂_u is then ``None``). x_t (B, C, H, W); t, omega_eff (B,); y (B,) labels fed (null where dropped)."""
        n = 2 if guided else 1
        head = "aux" if self.config.v_source == "aux_head" else "main"
        labels = None
        if y is not None:
            labels = torch.cat([y, torch.full_like(y, self.num_classes)]) if guided else y
        omega = torch.cat([omega_eff, torch.ones_like(omega_eff)]) if guided else omega_eff
        tt = torch.cat([t] * n)
        with torch.no_grad(), eval_mode(self.backbone):
            out = self.backbone(torch.cat([x_t] * n), tt, tt, y=labels, head=head, omega=omega_condition(omega),
                                t_min=torch.zeros_like(tt), t_max=torch.ones_like(tt)).to(x_t.dtype)
        parts = out.chunk(n)
        return parts[0], (parts[1] if guided else None)

    def terms(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None) -> IMFTerms:
        """Draw times, noise, guidance and dropout; build v_g and run the JVP (see :class:`IMFTerms`).

        Randomness, in order: 2·B normals (times), x-shaped normals (ε), 3·B uniforms (interval, ω),
        B uniforms (label dropout).
        """
        cfg, B, dev = self.config, x.shape[0], x.device
        dt = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dt)
        t, s = two_logit_normal_times(B, cfg.t_mean, cfg.t_std, cfg.r_equals_t_fraction, generator, dev, dt)
        eps = randn(tuple(x.shape), generator, dev, dt)
        x_t = interpolate(x, eps, t)
        v = eps - x
        omega, t_min, t_max = self.sample_guidance(t, s, generator)
        dropped = self.first_k_dropped(B, generator, dev)
        y_net = None if y is None else torch.where(dropped, torch.full_like(y, self.num_classes), y)
        inside = (t >= t_min) & (t <= t_max)
        omega_eff = torch.where(inside, omega, torch.ones_like(omega))
        guided = y is not None and self.num_classes > 0
        v_c, v_u = self.velocity_estimates(x_t, t, y_net, omega_eff, guided)
        v_g = v
        if guided:
            keep = per_sample(~dropped, v)
            v_g = torch.where(keep, v + per_sample(1 - 1 / omega_eff, v) * (v_c - v_u), v)
        v_hat, v_g = v_c.detach(), v_g.detach()

        head = "both" if cfg.v_source == "aux_head" else "main"
        out = backbone_jvp(self.backbone, x_t, t, s, (v_hat, torch.ones_like(t), None), y=y_net,
                           detach_tangent=True, head=head, omega=omega_condition(omega), t_min=t_min, t_max=t_max)
        u, dudt = out[0].to(dt), out[1].to(dt)
        v_aux = out[2].to(dt) if head == "both" else None
        V = u + per_sample(t - s, u) * dudt
        return IMFTerms(t=t, s=s, omega=omega, t_min=t_min, t_max=t_max, omega_eff=omega_eff, dropped=dropped,
                        x_t=x_t, v=v, v_hat=v_hat, v_g=v_g, u=u, dudt=dudt, V=V, v_aux=v_aux)

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Adaptive-weighted iMF loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Logs: ``loss_u`` and ``loss_v`` (unweighted ‖V − v_g‖² and ‖v − v_g‖² per dimension; no ``loss_v``
        for ``boundary``), ``weight`` (mean adaptive weight of the u-term), ``omega_mean``,
        ``frac_r_neq_t``, ``nonfinite`` (samples with a non-finite loss).
        """
        cfg = self.config
        tm = self.terms(x, y, generator)
        L_u = ((tm.V - tm.v_g) ** 2).flatten(1).sum(dim=1)
        w_u = adaptive_weight(L_u, cfg.norm_p, cfg.norm_eps)
        per = w_u * L_u
        dims = tm.u[0].numel()
        logs = {"loss_u": L_u.detach().mean() / dims, "weight": w_u.mean(), "omega_mean": tm.omega.mean(),
                "frac_r_neq_t": (tm.s != tm.t).float().mean()}
        if tm.v_aux is not None:
            L_v = ((tm.v_aux - tm.v_g) ** 2).flatten(1).sum(dim=1)
            per = per + adaptive_weight(L_v, cfg.norm_p, cfg.norm_eps) * L_v
            logs["loss_v"] = L_v.detach().mean() / dims
        logs["nonfinite"] = (~torch.isfinite(per.detach())).sum().float()
        return LossOutput(loss=per.mean(), per_sample=per.detach(), logs={k: v.detach() for k, v in logs.items()},
                          t=tm.t.detach())

    def flops_per_sample(self, forward_flops: float) -> float:
        """One no-grad pass for (v̂_c, v̂_u) on 2B (2 F; 1 F unconditional), the JVP with its primal
        (≈ 2 F) and the backward through the primal (≈ 2 F): 6 F (5 F unconditional). ``forward_flops``
        counts both heads, so the v-head's share is included."""
        return (6.0 if self.num_classes > 0 else 5.0) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One jump x_s = x_t − (t − s)·u(x_t, t, s; ω, [t_min, t_max], y): ω is ``cond.guidance`` (B,)
        or ``config.guidance``, the interval ``config.guidance_t_min/max``; one evaluation."""
        cfg = self.config
        net = net if net is not None else self.backbone
        omega = cond.guidance if cond.guidance is not None else torch.full_like(t, cfg.guidance)
        omega = omega.to(device=t.device, dtype=t.dtype)
        if bool((omega < 1).any()):
            raise ValueError(f"iMF guidance ω must be ≥ 1 (it embeds 1 − 1/ω), got {omega.min().item():g}")
        if cond.y is None or self.num_classes == 0:
            omega = torch.ones_like(omega)
        u = net(x, t.to(x.dtype), s.to(x.dtype), y=cond.y, omega=omega_condition(omega).to(x.dtype),
                t_min=torch.full_like(t, cfg.guidance_t_min).to(x.dtype),
                t_max=torch.full_like(t, cfg.guidance_t_max).to(x.dtype))
        return jump(x, t, s, u)
