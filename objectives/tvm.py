"""Terminal Velocity Matching (Zhou, Parger, Haque & Song 2025, arXiv 2511.19797), as the official code.

Notation (``docs/design/tvm.md`` §1; t = 1 noise, t = 0 data, x_t = (1 − t)·x₀ + t·ε, a jump goes t → s ≤ t).
The network F_θ(x, t, g = t − s, c, β) is called as ``net(x, t, s, y=c, guidance=β)`` (the DiT embeds
the gap t − s itself); β = 1/w is the inverse CFG scale and k = w with the scaled parameterisation
(``scaled``), else k = 1 (§1.2).

* Flow map (terminal point)  X_θ(x_t, t, s) = x_t + (s − t)·k·F_θ(x_t, t, s).
* Terminal velocity          V = ∂X_θ/∂s = k·[F_θ + (s − t)·∂_s F_θ], from one JVP over (x_t, t, s)
  with tangents (0, 0, +1); c and β are closed over (§1.5). Gradients flow through F and ∂_sF
  unless ``detach_jvp``.
* Terminal target            u⁻ = k·F_θ⁻(sg(X), s, s, c, β): the 0.99-EMA teacher θ⁻ at gap 0 (§1.6.1).
* FM term at s′ (gap*)       u_θ = k·F_θ(x_s′, s′, s′, c, β),
                             v_cfg = w·(ε − x₀) + (1 − w)·F_θ⁻(x_s′, s′, s′, ∅, β = 1) (§1.6.2).
* Per sample                 L = 1[s ≉ t]·mean_CHW (β·(V − u⁻))² + mean_CHW (β·(u_θ − v_cfg))² (§1.6.3).

Both teacher evaluations run as one no-grad pass on 2B samples. Times come from the gap* sampler
(:func:`fewstep.objectives.time_samplers.gap_star`, §1.3); guidance and label dropout follow §1.4
(dropped samples get the null label and w = 1). Sampling (§4): x ← x + (s − t)·k·F(x, t, s, c, 1/w),
one evaluation per step (CFG is distilled in).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.ema import frozen_copy
from fewstep.objectives.common import drop_labels, interpolate, mean_flat, per_sample, rand, randn
from fewstep.objectives.jvp import backbone_jvp
from fewstep.objectives.time_samplers import gap_star
from fewstep.registry import objectives

T_BUCKETS = 4   # logs bin the two terms by t into [0, ¼), [¼, ½), [½, ¾), [¾, 1]


@dataclass(kw_only=True)
class TVMConfig(ObjectiveConfig):
    """Terminal Velocity Matching settings (defaults: the official ImageNet-256 w = 2 config).

    Attributes:
        guidance: constant CFG scale w ≥ 1 (β = 1/w is the backbone's guidance input), also the
            default at sampling. ``None`` draws w per sample: U(guidance_min, guidance_max) when that
            range is set (as the official code; the paper draws β uniformly), else β ~ U(0, 1].
        guidance_min, guidance_max: range of the random w (only with ``guidance=None``).
        label_dropout: probability of training a sample with the null label (and w = 1).
        scaled: the scaled parameterisation: the map, its s-derivative, the teacher's terminal velocity
            and the student's FM velocity are multiplied by k = w (``do_scale_param``).
        teacher_beta: decay of the EMA teacher θ⁻, updated after every optimizer step.
        gap_mean, gap_std: logit-normal law of the gap g = t − s.
        s_mean, s_std: logit-normal law of s (truncated to s ≤ 1 − g) and of the FM time s′.
        detach_jvp: stop the gradient through the tangent ∂_sF (cheaper, biased; paper Fig. 10).
    """

    name: str = "tvm"
    guidance: float | None = 2.0
    guidance_min: float | None = None
    guidance_max: float | None = None
    label_dropout: float = 0.1
    scaled: bool = True
    teacher_beta: float = 0.99
    gap_mean: float = -0.8
    gap_std: float = 1.0
    s_mean: float = -0.4
    s_std: float = 1.0
    detach_jvp: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.guidance is None or self.guidance > 0, f"guidance must be > 0, got {self.guidance}"),
            (0 <= self.label_dropout <= 1, f"label_dropout must lie in [0, 1], got {self.label_dropout}"),
            (0 <= self.teacher_beta <= 1, f"teacher_beta must lie in [0, 1], got {self.teacher_beta}"),
            (self.gap_std > 0 and self.s_std > 0, f"gap_std and s_std must be > 0, got {self.gap_std}, {self.s_std}"),
        ]
        require(checks, "TVMConfig")

    def check_guidance(self) -> None:
        """Cross-field guidance checks (run when the objective is built, so that ``--set`` overrides
        applied one field at a time may pass through intermediate states)."""
        ranged = (self.guidance_min, self.guidance_max)
        if self.guidance is not None and ranged != (None, None):
            raise ValueError(f"TVMConfig: guidance={self.guidance} and a random range {ranged} are both set; "
                             f"set guidance=None to draw w ~ U(guidance_min, guidance_max)")
        if (ranged[0] is None) != (ranged[1] is None):
            raise ValueError(f"TVMConfig: set both guidance_min and guidance_max or neither, got {ranged}")
        if ranged[0] is not None and not 0 < ranged[0] <= ranged[1]:
            raise ValueError(f"TVMConfig: need 0 < guidance_min ≤ guidance_max, got {ranged}")


@dataclass
class TVMTerms:
    """The two loss terms of one batch and the tensors they are built from.

    Attributes:
        terminal: (B,) mean_CHW (β·(V − u⁻))², before the s ≈ t mask.
        fm: (B,) mean_CHW (β·(u_θ − v_cfg))².
        X: (B, C, H, W) flow-map point X_θ(x_t, t, s) (with graph).
        V: (B, C, H, W) terminal velocity ∂X_θ/∂s (with graph).
        u_terminal: (B, C, H, W) teacher target u⁻ (no graph).
        u_fm: (B, C, H, W) student velocity u_θ at s′ (with graph).
        v_cfg: (B, C, H, W) guided FM target (no graph).
    """

    terminal: Tensor
    fm: Tensor
    X: Tensor
    V: Tensor
    u_terminal: Tensor
    u_fm: Tensor
    v_cfg: Tensor


@objectives.register("tvm", summary="Terminal Velocity Matching: flow map + JVP terminal velocity, EMA teacher, distilled CFG")
class TVM(Objective):
    """Terminal Velocity Matching with the gap* sampler, an EMA teacher and distilled CFG.

    The teacher θ⁻ (``self.teacher``) is a frozen copy of the backbone, kept in eval mode, updated
    by :meth:`after_step` with ``teacher_beta``; it is part of the state dict (checkpoints).
    """

    Config = TVMConfig
    needs = ObjectiveNeeds(time_inputs=2, jvp=True, teacher="ema", cfg="distilled", guidance_input=True)
    config: TVMConfig

    def __init__(self, backbone: nn.Module, config: TVMConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        config.check_guidance()
        super().__init__(backbone, config, num_classes, ema_betas)
        self.teacher = frozen_copy(backbone)

    def teacher_tracks(self) -> list[tuple[nn.Module, float]]:
        return [(self.teacher, self.config.teacher_beta)]

    def train(self, mode: bool = True) -> "TVM":
        """Train/eval the objective; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- training -------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        Logs: ``loss_terminal`` and ``loss_fm`` (batch means; the terminal term after the s ≈ t mask),
        ``loss_terminal_t{i}`` / ``loss_fm_t{i}`` (batch mean of the term times 1[t in bucket i], so
        the four buckets sum to the term and average exactly over accumulation rounds; divide by
        ``frac_t{i}``, the bucket's share of samples, for the mean within the bucket), ``guidance_mean``
        (mean w) and ``nonfinite`` (number of non-finite per-sample losses; they are not zeroed).
        """
        cfg, B = self.config, x.shape[0]
        times = gap_star(B, cfg.gap_mean, cfg.gap_std, cfg.s_mean, cfg.s_std, generator, x.device)
        w = self.training_guidance(B, generator, x.device)
        eps = randn(tuple(x.shape), generator, x.device, x.dtype)
        y, dropped = drop_labels(y, cfg.label_dropout, self.num_classes, generator)
        if y is not None:
            w = torch.where(dropped.to(w.device), torch.ones_like(w), w)
        terms = self.terms(x, y, eps, times.t, times.s, times.s_prime, w)
        jump = ~torch.isclose(times.s, times.t, rtol=1e-5, atol=1e-8)
        terminal = terms.terminal * jump.to(terms.terminal.dtype)      # 0·NaN stays NaN: never hidden
        loss = terminal + terms.fm
        logs: dict[str, Tensor | float] = {
            "loss_terminal": terminal.detach().mean(), "loss_fm": terms.fm.detach().mean(),
            "guidance_mean": w.detach().float().mean(), "nonfinite": (~torch.isfinite(loss)).sum().detach()}
        bucket = (times.t * T_BUCKETS).long().clamp(0, T_BUCKETS - 1)
        for i in range(T_BUCKETS):
            inside = bucket == i
            logs[f"loss_terminal_t{i}"] = torch.where(inside, terminal.detach(), 0).mean()
            logs[f"loss_fm_t{i}"] = torch.where(inside, terms.fm.detach(), 0).mean()
            logs[f"frac_t{i}"] = inside.float().mean()
        return LossOutput(loss=loss.mean(), per_sample=loss.detach(), logs=logs, t=times.t.detach())

    def training_guidance(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n,) float32 CFG scales w for training (before label dropout), as the official code (§1.4)."""
        cfg = self.config
        if cfg.guidance is not None:
            return torch.full((n,), float(cfg.guidance), device=device)
        if cfg.guidance_min is not None:
            return cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * rand(n, generator, device)
        return 1.0 / (1.0 - rand(n, generator, device))   # β = 1 − U[0, 1) ~ U(0, 1], never 0

    def terms(self, x: Tensor, y: Tensor | None, eps: Tensor, t: Tensor, s: Tensor, s_prime: Tensor,
              w: Tensor) -> TVMTerms:
        """Both loss terms for given randomness (the deterministic core of :meth:`forward`).

        Args:
            x: (B, C, H, W) data x₀; eps: (B, C, H, W) noise ε, shared by x_t and x_s′.
            y: (B,) labels after dropout (``num_classes`` = null) or ``None``.
            t, s: (B,) jump times, s ≤ t; s_prime: (B,) FM times; all in [0, 1].
            w: (B,) CFG scales (1 for dropped labels); β = 1/w.
        """
        dt = torch.promote_types(x.dtype, torch.float32)
        x, eps = x.to(dt), eps.to(dt)
        t, s, s_prime, w = (v.to(dt) for v in (t, s, s_prime, w))
        beta = 1 / w
        k = w if self.config.scaled else torch.ones_like(w)
        x_t = interpolate(x, eps, t)
        x_sp = interpolate(x, eps, s_prime)
        X, V = self.terminal(x_t, t, s, y, beta, k)

        with torch.no_grad():   # one teacher pass on 2B: [sg(X), x_s′] at [s, s′], gap 0, [c, ∅], [β, 1]
            y2 = None if y is None else torch.cat([y, torch.full_like(y, self.num_classes)])
            t2 = torch.cat([s, s_prime])
            F_target, F_uncond = self.teacher(torch.cat([X.detach(), x_sp]), t2, t2, y=y2,
                                              guidance=torch.cat([beta, torch.ones_like(beta)])).to(dt).chunk(2)
            u_terminal = per_sample(k, x) * F_target
            v_cfg = per_sample(w, x) * (eps - x) + per_sample(1 - w, x) * F_uncond

        u_fm = per_sample(k, x) * self.backbone(x_sp, s_prime, s_prime, y=y, guidance=beta).to(dt)
        b = per_sample(beta, x)
        return TVMTerms(terminal=mean_flat((b * (V - u_terminal)) ** 2), fm=mean_flat((b * (u_fm - v_cfg)) ** 2),
                        X=X, V=V, u_terminal=u_terminal, u_fm=u_fm, v_cfg=v_cfg)

    def terminal(self, x_t: Tensor, t: Tensor, s: Tensor, y: Tensor | None, beta: Tensor,
                 k: Tensor) -> tuple[Tensor, Tensor]:
        """(X_θ, V): the flow-map point and ∂X_θ/∂s = k·[F + (s − t)·∂_sF] from one JVP of the online
        backbone over (x_t, t, s) with tangents (0, 0, 1); y and β (B,) get no tangent; k (B,)."""
        F_ts, dF_ds = backbone_jvp(self.backbone, x_t, t, s, (None, None, torch.ones_like(s)), y=y,
                                   guidance=beta, detach_tangent=self.config.detach_jvp)
        F_ts, dF_ds = F_ts.to(x_t.dtype), dF_ds.to(x_t.dtype)
        gap_k = per_sample((s - t) * k, x_t)
        return x_t + gap_k * F_ts, per_sample(k, x_t) * F_ts + gap_k * dF_ds

    def flops_per_sample(self, forward_flops: float) -> float:
        """Per sample, in forwards F: JVP pass (primal + tangent) 2F; its backward 4F (2F when
        ``detach_jvp``: primal only); teacher forward on 2B samples 2F; student FM forward 1F and
        backward 2F. Total 11F (9F detached)."""
        jvp_backward = 2.0 if self.config.detach_jvp else 4.0
        return (2.0 + jvp_backward + 2.0 + 3.0) * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One flow-map jump t → s: x + (s − t)·k·F(x, t, s, c, β = 1/w); one evaluation.

        w is ``cond.guidance`` (B,), else ``config.guidance``, else 1.
        """
        net = self.backbone if net is None else net
        w = cond.guidance
        if w is None:
            w = torch.full_like(t, 1.0 if self.config.guidance is None else float(self.config.guidance))
        w = w.to(device=t.device, dtype=t.dtype)
        k = w if self.config.scaled else torch.ones_like(w)
        F = net(x, t, s, y=cond.y, guidance=1 / w)
        return x + per_sample((s - t) * k, x).to(x.dtype) * F.to(x.dtype)
