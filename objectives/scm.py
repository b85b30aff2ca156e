"""Continuous-time consistency training, sCT (Lu & Song 2024, "sCM"; docs/design/objectives.md §3).

Everything is TrigFlow inside the objective and our convention at its boundary (§8.3, :mod:`.trigflow`).
TrigFlow: x_τ = cos τ·x₀ + sin τ·z, z = σ_d·ε, τ ∈ [0, π/2]. Consistency function (§3.1)

    f_θ(x_τ, τ) = cos τ·x_τ − sin τ·σ_d·F_θ(x_τ/σ_d, τ)            (f_θ(x, 0) = x for free).

**Backbone map.** The backbone is a one-time model called with *our* time and state, never with τ:
F_θ(x_τ/σ_d, τ) := net(k(τ)·x_τ, t(τ), s=None, y), where x_t = k(τ)·x_τ is the same noisy point written
in our convention: the input every other objective's backbone sees, so backbones and checkpoints
carry over. It is the paper's input x_τ/σ_d times σ_d·k(τ), a smooth per-time scale in [0.45, 1] at
σ_d = 0.5 that the time-conditioned network absorbs; nothing divides by cos τ or 1 − t. ``parameterization`` reads the output as
``trigflow``: F_θ = net(·) (the paper's raw F); or ``velocity``: net(·) is our velocity v ≈ ε − x and
F_θ = v/(σ_p cos τ + σ_d sin τ) + (cos τ/σ_p − sin τ/σ_d)·x_t, which makes f_θ = x_t − t·v exactly
(the flow-matching one-jump data prediction, so an FM checkpoint is a diffusion initialisation as
Algorithm 1 asks). F_θ − F_θ⁻ only scales by a(τ) ∈ [0.89, 2], which w_φ absorbs.

**Loss** (Algorithm 1, §3.2). σ ~ LogNormal(P_mean, P_std²) clipped at ``train_sigma_max``,
τ = arctan(σ/σ_d); dx_τ/dτ = cos τ·z − sin τ·x₀ (sCT). One JVP of F_θ at (x_τ, τ) with the
"rearranged" tangents (cos τ sin τ·dx_τ/dτ, cos τ sin τ) gives cos τ sin τ·dF_θ/dτ; its primal output is
F_θ (with gradient), F_θ⁻ = sg(F_θ) and the tangent is detached (θ⁻ = stop-gradient θ). Then

    g = −cos²τ·(σ_d F_θ⁻ − dx_τ/dτ) − r·cos τ sin τ·(x_τ + σ_d dF_θ⁻/dτ)   (= cos τ·df_θ⁻/dτ at r = 1),
    g ← g/(‖g‖ + c),  r = min(1, nimg/warmup)  (tangent normalisation and warm-up),
    L = e^{w_φ(τ)}/D·‖F_θ − F_θ⁻ − g‖² − w_φ(τ)  (learned adaptive weighting, D = C·H·W).

**Sampling** (§3.3) jumps to the data end and re-noises in our convention: x̂₀ = f_θ(x_τ(t), τ(t)),
x_s = (1 − s)·x̂₀ + s·σ_p·noise. τ is capped at τ_max = arctan(σ_max/σ_d) (σ_max = 80): at t = 1 the
state x_τ = (σ_d/σ_p)·x₁ = z is exact and only the *time* fed is τ_max, which is the paper's
x̂₀ = f_θ(z, t_max).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig, require
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import mean_flat, per_sample, randn
from fewstep.objectives.jvp import backbone_jvp
from fewstep.objectives.trigflow import state_scale, t_from_tau, tau_from_sigma, tau_from_t
from fewstep.registry import objectives

SIGMA_P = 1.0   # prior std of our convention: x_1 = ε ~ N(0, I)


@dataclass(kw_only=True)
class SCMConfig(ObjectiveConfig):
    """sCT settings (defaults: the paper / FastGen CIFAR-10 sCT).

    Attributes:
        sigma_data: σ_d, the TrigFlow data std. It must match the std of the training data (0.5 for
            pixels in [−1, 1]; normalise latents to it), since TrigFlow's prior is N(0, σ_d²I).
        p_mean, p_std: log-normal EDM-σ proposal, ln σ ~ N(p_mean, p_std²); τ = arctan(σ/σ_d).
            CIFAR (−1.0, 1.4); ImageNet-64 (−1.0, 1.6); ImageNet-512 (−0.8, 1.6).
        train_sigma_max: proposals are clipped at this σ (FastGen sCT: 800).
        sigma_max: sampling starts at τ_max = arctan(sigma_max/σ_d) (the paper's t_max, σ = 80).
        tau_mid: TrigFlow time (radians) of the 2-step intermediate (1.1 in every paper setting).
        tangent_c: c in g/(‖g‖ + c).
        tangent_norm: ``l2`` (‖g‖₂ per sample, the paper) or ``rms`` (‖g‖₂/√D, FastGen's option).
        warmup_kimg: tangent warm-up length in kimg; r = min(1, kimg/warmup_kimg) (the paper's 10k
            iterations at FastGen's CIFAR batch 512 = 5120 kimg; 0 = no warm-up).
        adaptive_weight: learn w_φ(τ) (False: w = 0, plain loss ‖F − F⁻ − g‖²/D).
        weight_hidden: hidden width of the w_φ MLP.
        parameterization: ``trigflow`` (backbone output = F_θ) or ``velocity`` (output = our v).
    """

    name: str = "scm"
    sigma_data: float = 0.5
    p_mean: float = -1.0
    p_std: float = 1.4
    train_sigma_max: float = 800.0
    sigma_max: float = 80.0
    tau_mid: float = 1.1
    tangent_c: float = 0.1
    tangent_norm: Literal["l2", "rms"] = "l2"
    warmup_kimg: float = 5120.0
    adaptive_weight: bool = True
    weight_hidden: int = 64
    parameterization: Literal["trigflow", "velocity"] = "trigflow"

    def __post_init__(self) -> None:
        tau_max = math.atan(self.sigma_max / self.sigma_data) if self.sigma_data > 0 else 0.0
        checks = [
            (self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}"),
            (self.p_std > 0, f"p_std must be > 0, got {self.p_std}"),
            (self.train_sigma_max > 0 and self.sigma_max > 0, "sigma_max and train_sigma_max must be > 0"),
            (0 < self.tau_mid < tau_max, f"tau_mid must lie in (0, τ_max = {tau_max:.4f}), got {self.tau_mid}"),
            (self.tangent_c > 0, f"tangent_c must be > 0, got {self.tangent_c}"),
            (self.tangent_norm in ("l2", "rms"), f"tangent_norm must be 'l2' or 'rms', got {self.tangent_norm!r}"),
            (self.warmup_kimg >= 0, f"warmup_kimg must be ≥ 0, got {self.warmup_kimg}"),
            (self.weight_hidden >= 1, f"weight_hidden must be ≥ 1, got {self.weight_hidden}"),
            (self.parameterization in ("trigflow", "velocity"),
             f"parameterization must be 'trigflow' or 'velocity', got {self.parameterization!r}"),
        ]
        require(checks, "SCMConfig")


class AdaptiveWeight(nn.Module):
    """w_φ(τ): τ (B,) → (B,) log-weights; ``Linear → SiLU → Linear`` on [cos ωτ, sin ωτ] features,
    ω geometric in [1, 32] rad⁻¹ (16 frequencies). The output layer starts at zero (w = 0, unit weight).
    Owned by the objective, trained with the backbone, not part of any EMA."""

    def __init__(self, hidden: int, frequencies: int = 16):
        super().__init__()
        self.register_buffer("omega", 32.0 ** torch.linspace(0, 1, frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, tau: Tensor) -> Tensor:
        args = tau[:, None].to(self.omega.dtype) * self.omega[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(1)


@objectives.register("scm", summary="continuous-time consistency training (sCT, TrigFlow; Lu & Song 2024)")
class SCM(Objective):
    """sCT: TrigFlow consistency model, one stop-gradient JVP, tangent normalisation and warm-up,
    learned adaptive weighting; multi-step sampling by re-noising."""

    Config = SCMConfig
    needs = ObjectiveNeeds(time_inputs=1, jvp=True, teacher="stopgrad", cfg="none", renoise=True)
    progress_log = "loss_unweighted"   # ``loss`` includes the learnt log-variance and goes negative
    config: SCMConfig

    def __init__(self, backbone: nn.Module, config: SCMConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        super().__init__(backbone, config, num_classes, ema_betas)
        self.weight_net = AdaptiveWeight(config.weight_hidden) if config.adaptive_weight else None

    # -- parameterisation -----------------------------------------------------------------------
    def F(self, x_tau: Tensor, tau: Tensor, y: Tensor | None, net: nn.Module | None = None) -> Tensor:
        """TrigFlow F_θ(x_τ/σ_d, τ): x_τ (B, C, H, W), τ (B,) in [0, π/2] → (B, C, H, W) in x_τ's dtype.
        Calls ``net(k(τ)·x_τ, t(τ), y=y)`` (see the module docstring)."""
        x_t, t = self.backbone_inputs(x_tau, tau)
        out = (net if net is not None else self.backbone)(x_t, t, y=y).to(x_tau.dtype)
        return out if self.config.parameterization == "trigflow" else self.read_out(out, x_t, tau)

    def F_jvp(self, x_tau: Tensor, tau: Tensor, y: Tensor | None, tx: Tensor, ttau: Tensor, *,
              detach_tangent: bool = False) -> tuple[Tensor, Tensor]:
        """(F_θ(x_τ, τ), its JVP along (tx, tτ)), shapes as :meth:`F`. The cheap maps into and out of
        the backbone (:meth:`backbone_inputs`, :meth:`read_out`) go through ``torch.func.jvp``; the
        backbone through :func:`backbone_jvp` (the DiT's own tangent rules and fused kernel)."""
        (x_t, t), (tx_t, tt) = torch.func.jvp(self.backbone_inputs, (x_tau, tau), (tx, ttau))
        out, tout = backbone_jvp(self.backbone, x_t, t, None, (tx_t, tt, None), y=y, detach_tangent=detach_tangent)
        out, tout = out.to(x_tau.dtype), tout.to(x_tau.dtype)
        if self.config.parameterization == "trigflow":
            return out, tout
        F, tF = torch.func.jvp(self.read_out, (out, x_t, tau), (tout, tx_t, ttau))
        return F, (tF.detach() if detach_tangent else tF)

    def backbone_inputs(self, x_tau: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t = k(τ)·x_τ, t(τ)): the TrigFlow point in our convention, as the backbone sees it."""
        sd = self.config.sigma_data
        return x_tau * per_sample(state_scale(tau, sd, SIGMA_P), x_tau), t_from_tau(tau, sd, SIGMA_P)

    def read_out(self, v: Tensor, x_t: Tensor, tau: Tensor) -> Tensor:
        """``velocity`` parameterisation: F_θ = v·k(τ)/σ_p + (cos τ/σ_p − sin τ/σ_d)·x_t."""
        k = state_scale(tau, self.config.sigma_data, SIGMA_P)
        b = torch.cos(tau) / SIGMA_P - torch.sin(tau) / self.config.sigma_data
        return v * per_sample(k / SIGMA_P, v) + x_t * per_sample(b, x_t)

    def consistency_fn(self, x_tau: Tensor, tau: Tensor, y: Tensor | None, net: nn.Module | None = None) -> Tensor:
        """f_θ(x_τ, τ) = cos τ·x_τ − sin τ·σ_d·F_θ: the predicted data end, shaped like x_τ."""
        F = self.F(x_tau, tau, y, net)
        return per_sample(torch.cos(tau), x_tau) * x_tau - per_sample(torch.sin(tau) * self.config.sigma_data, F) * F

    # -- training -------------------------------------------------------------------------------
    def velocity(self, x0: Tensor, z: Tensor, x_tau: Tensor, tau: Tensor, y: Tensor | None) -> Tensor:
        """dx_τ/dτ used for the tangent: sCT's conditional cos τ·z − sin τ·x₀ (override for sCD)."""
        return per_sample(torch.cos(tau), z) * z - per_sample(torch.sin(tau), x0) * x0

    def consistency_tangent(self, x_tau: Tensor, tau: Tensor, dx_dtau: Tensor, y: Tensor | None,
                            r: float) -> tuple[Tensor, Tensor, Tensor]:
        """One JVP of F_θ along (dx_τ/dτ, 1), rearranged (tangents scaled by cos τ sin τ).

        Returns (F, cs_dF, g): F_θ(x_τ, τ) with gradient; cos τ sin τ·dF_θ⁻/dτ and the raw tangent g
        (before normalisation, with warm-up factor r ∈ [0, 1]), both detached. All (B, C, H, W).
        """
        sd, cos, sin = self.config.sigma_data, torch.cos(tau), torch.sin(tau)
        cs = cos * sin
        F, cs_dF = self.F_jvp(x_tau, tau, y, per_sample(cs, dx_dtau) * dx_dtau, cs, detach_tangent=True)
        F_minus = F.detach()
        g = -per_sample(cos ** 2, F) * (sd * F_minus - dx_dtau) - r * (per_sample(cs, x_tau) * x_tau + sd * cs_dF)
        return F, cs_dF, g

    def warmup(self, nimg: int) -> float:
        """Tangent warm-up factor r = min(1, nimg / (1000·warmup_kimg)) ∈ [0, 1]."""
        w = self.config.warmup_kimg * 1000
        return 1.0 if w <= 0 else min(1.0, nimg / w)

    def sample_tau(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(n,) τ = arctan(σ/σ_d), ln σ ~ N(p_mean, p_std²), σ ≤ train_sigma_max."""
        cfg = self.config
        sigma = torch.exp(cfg.p_mean + cfg.p_std * randn((n,), generator, device)).clamp(max=cfg.train_sigma_max)
        return tau_from_sigma(sigma, cfg.sigma_data)

    def loss_terms(self, F: Tensor, g: Tensor, tau: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample e^{w_φ(τ)}/D·‖F − F⁻ − ĝ‖² − w_φ(τ) (B,) with ĝ = g/(‖g‖ + c), and logs."""
        cfg = self.config
        norm = g.flatten(1).norm(dim=1)
        if cfg.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        g_hat = g / per_sample(norm + cfg.tangent_c, g)
        unweighted = mean_flat((F - F.detach() - g_hat) ** 2)
        w = self.weight_net(tau).to(F.dtype) if self.weight_net is not None else torch.zeros_like(unweighted)
        per = torch.exp(w) * unweighted - w
        logs = {"loss_unweighted": unweighted.detach().mean(), "weight_mean": w.detach().mean(),
                "tangent_norm": norm.detach().mean(), "nonfinite": (~torch.isfinite(per.detach())).sum()}
        return per, logs

    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """sCT loss on data ``x`` (B, C, H, W) (std ≈ σ_d) with labels ``y`` (B,) or ``None``."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x0 = x.to(dtype)
        tau = self.sample_tau(x.shape[0], generator, x.device).to(dtype)
        z = self.config.sigma_data * randn(tuple(x.shape), generator, x.device, dtype)
        x_tau = per_sample(torch.cos(tau), x0) * x0 + per_sample(torch.sin(tau), z) * z
        y = y if self.num_classes else None
        r = self.warmup(nimg)
        F, _, g = self.consistency_tangent(x_tau, tau, self.velocity(x0, z, x_tau, tau, y), y, r)
        per, logs = self.loss_terms(F, g, tau)
        loss = per.mean()
        logs = {"loss": loss.detach(), **logs, "warmup": torch.tensor(r)}
        return LossOutput(loss=loss, per_sample=per.detach(), logs=logs)

    def flops_per_sample(self, forward_flops: float) -> float:
        """One JVP that keeps the primal's graph (primal + tangent ≈ 2F) and the backward through the
        primal only (the tangent is detached: 2F) = 4F; w_φ is negligible."""
        return 4.0 * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def tau_max(self) -> float:
        return tau_from_sigma(self.config.sigma_max, self.config.sigma_data)

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Jump from t to the data end, x̂₀ = f_θ(x_τ(t), min(τ(t), τ_max)), then re-noise to s:
        (1 − s)·x̂₀ + s·σ_p·noise (x̂₀ itself where s = 0). x (B, C, H, W); t, s (B,) in [0, 1]."""
        if cond.guidance is not None and not bool((cond.guidance == 1).all()):
            raise ValueError("sCT has no classifier-free guidance (cfg='none'); sample with guidance 1 or None")
        net = net if net is not None else self.backbone
        param = next(net.parameters(), None)
        dtype = torch.promote_types(x.dtype, param.dtype if param is not None else x.dtype)
        x, t, s = x.to(dtype), t.to(dtype), s.to(dtype)
        tau = tau_from_t(t, self.config.sigma_data, SIGMA_P)
        x_tau = x / per_sample(state_scale(tau, self.config.sigma_data, SIGMA_P), x)   # exact state
        x0 = self.consistency_fn(x_tau, tau.clamp(max=self.tau_max()), cond.y, net)     # capped time
        if noise is None:
            if bool((s > 0).any()):
                raise ValueError("re-noising to s > 0 needs noise= (the sampler passes it: needs.renoise)")
            return x0
        return per_sample(1 - s, x0) * x0 + per_sample(s * SIGMA_P, x0) * noise.to(dtype)

    def default_schedule(self, nfe: int) -> list[float]:
        """[1, 0] for one jump; [1, t(τ_mid), 0] for two (τ_mid = 1.1 rad → t ≈ 0.4955 at σ_d = 0.5);
        for n > 2 the n − 1 re-noise levels are evenly spaced in τ from τ_mid down to τ_mid/(n − 1)."""
        if nfe < 1:
            raise ValueError(f"nfe must be ≥ 1, got {nfe}")
        taus = torch.tensor([self.config.tau_mid * (nfe - i) / (nfe - 1) for i in range(1, nfe)], dtype=torch.float64)
        mids = t_from_tau(taus, self.config.sigma_data, SIGMA_P).tolist() if nfe > 1 else []
        return [1.0, *mids, 0.0]
