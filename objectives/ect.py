"""Easy Consistency Tuning (ECT; Geng et al., "Consistency Models Made Easy", arXiv 2406.14548).

Discrete consistency training in EDM σ (docs/design/objectives.md §4, §4.2; official locuslab/ect
``training/loss.py: ECMLoss``), with the boundary-respecting CM preconditioning of :mod:`.edm`:

1. σ_t ~ lognormal: ln σ_t ~ N(P_mean, P_std²) (CIFAR −1.1, 2.0; IN-64 −0.8, 1.6), truncated to
   σ_t > σ_min by inverse CDF (below σ_min, c_out < 0 breaks the boundary form; at σ_t = σ_min the
   residual is exactly 0 and the L2 norm's gradient is NaN). That cuts 0.5% of the mass at the defaults.
2. The shrinking gap ("sigmoid mapping function"), stage = ⌊nimg / (stage_kimg·1000)⌋:
       σ_r = max(0, σ_t·(1 − q^{−(stage+1)}·n(σ_t))),   n(σ) = 1 + k·sigmoid(−b·σ),   k = 8, b = 1.
   Early stages give σ_r = 0 (plain denoising); each stage divides the relative gap by q. Past
   q^{stage+1} ≈ 10⁶ the gap falls below float32 resolution (σ_r rounds to σ_t): keep stages fewer.
3. Same ε for both points, and the target pass without gradient (θ⁻ = sg θ, no EMA teacher):
       Δ = f_θ(x + σ_t·ε, σ_t) − sg f_θ(x + σ_r·ε, σ_r),  σ_r raised to σ_min, where the boundary
   condition makes the target x + σ_min·ε without a network call (ECT, with plain EDM preconditioning,
   uses D(x, 0) = x for r = 0; the two differ by σ_min·ε). The weight keeps the unclamped σ_r.
4. Pseudo-Huber distance on the whole vector, as ECT/iCT do (not averaged over C·H·W):
       d = √(‖Δ‖² + c²) − c,  c = 0.00054·√(C·H·W) by default (iCT's rule; 0.06 at IN-64 = ECT's IN-64
   default); c = 0 is ECT-CIFAR's plain L2 norm.
5. Weight λ = 1/(σ_t − σ_r) (ECT main branch / CIFAR, iCT) or "snrpk" 1/σ_t² + 1/σ_d² (ECT IN-64).
   Per-sample loss λ·d; the loss is its batch mean.

Differences from the official code, on purpose: the CM boundary form is used in training too (ECT trains
with plain EDM c_skip/c_out and switches at evaluation); non-finite targets are not zeroed
(``nan_to_num``) but counted in ``logs["nonfinite"]`` and left to reach the trainer. ECT initialises
from a pretrained diffusion model; here the backbone is whatever the caller gives.

Shared randomness: the target pass re-uses the grad pass's dropout masks by restoring the global RNG
state of x's device before it (ECT restores the CUDA RNG). Our DiT has no dropout, so this is a no-op
there. Sampling (``step``): x̂₀ = f_θ(x_t/(1 − t), σ(t)), then re-noise to s: x_s = (1 − s)·x̂₀ + s·noise
(EDM x̂₀ + σ_s·noise); ``default_schedule`` is [1] + intermediate [t(σ_mid), …] + [0]. The first jump
starts from the sampler's pure noise z at t = 1 (σ = ∞), which ECT's sampler replaces by x_σ = σ_max·z at
σ = σ_max (official ``generator_fn``: ``latents * t_steps[0]``): so does ``step`` at t = 1. (Reading z
as the state at t(σ_max) = 80/81 instead would give x_σ = z/(1 − t) = 81·z, a 1.25 % too large input.)

Deviations from the official settings, documented (docs/design/ect-settings.md):

* ``sigma_min`` = 0.002 (iCT's and EDM's), where ECT's evaluation preconditioning (``ECMPrecond``) uses
  0.003. ECT trains with plain EDM c_skip/c_out (no σ_min) and switches to the boundary form only to
  evaluate; we train the boundary form, so training and sampling must share one σ_min, and we keep the
  consistency-model value. Set ``objective.sigma_min=0.003`` for ECT's evaluation value.
* ``huber_c=None`` (iCT's c = 0.00054·√(C·H·W)) where ECT's CIFAR-10 recipe uses c = 0 (a plain L2 norm).
  We train from scratch, not from a pretrained diffusion model: c > 0 keeps the gradient of d bounded for
  small residuals. ``objective.huber_c=0`` gives ECT-CIFAR's distance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig
from fewstep.contracts import Condition, LossOutput, Objective, ObjectiveNeeds
from fewstep.objectives.common import per_sample, rand, randn
from fewstep.objectives.edm import consistency_function, sigma_from_t, t_from_sigma, x_sigma_from_x_t
from fewstep.registry import objectives

SIGMA_P = 1.0   # the toolkit prior std: x_t = (1 − t)·x + t·ε with ε ~ N(0, I) (contracts.py)


@dataclass(kw_only=True)
class ECTConfig(ObjectiveConfig):
    """ECT settings (defaults: the CIFAR-10 ECM recipe (docs/design/ect-settings.md) except two documented
    deviations, ``sigma_min`` and ``huber_c``; see the module docstring).

    Attributes:
        sigma_data: σ_d of the preconditioning (data std; 0.5 for pixels in [−1, 1]).
        sigma_min, sigma_max: EDM noise range; f(x, σ_min) = x; sampling starts at σ_max (x_σ = σ_max·z).
            σ_min 0.002 (iCT/EDM) in training and sampling; ECT evaluates with 0.003 (a deviation).
        P_mean, P_std: ln σ_t ~ N(P_mean, P_std²) (IN-64: −0.8, 1.6).
        q: gap shrink factor per stage (CIFAR 2, IN-64 4).
        k, b: the sigmoid mapping n(σ) = 1 + k·sigmoid(−b·σ).
        stage_kimg: images (thousands) per stage; ECT: every 25k iterations at batch 128 = 3200 kimg.
        huber_c: pseudo-Huber c (whole-vector units); ``None`` = 0.00054·√(C·H·W) (iCT's rule, a deviation:
            ECT-CIFAR uses 0); 0 = L2 norm.
        weighting: ``gap`` 1/(σ_t − σ_r) (ECT CIFAR, iCT) or ``snrpk`` 1/σ_t² + 1/σ_d² (ECT IN-64).
        sigma_mid: 2-step intermediate σ (0.821 ECT CIFAR; 1.526 ECT IN-64). For nfe ≥ 3 the
            intermediate σ's are log-spaced from σ_max to σ_mid (our extension; ECT reports ≤ 2 steps).
    """

    name: str = "ect"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0
    k: float = 8.0
    b: float = 1.0
    stage_kimg: float = 3200.0
    huber_c: float | None = None
    weighting: Literal["gap", "snrpk"] = "gap"
    sigma_mid: float = 0.821


def truncated_lognormal(n: int, P_mean: float, P_std: float, sigma_min: float, generator: torch.Generator | None,
                        device: torch.device) -> Tensor:
    """(n,) float64 σ with ln σ ~ N(P_mean, P_std²) conditioned on σ > σ_min (inverse CDF, one uniform each)."""
    lo = 0.5 * math.erfc(-(math.log(sigma_min) - P_mean) / (P_std * math.sqrt(2)))   # Φ(z_min)
    u = rand(n, generator, device).double() + 2.0 ** -25     # float32 uniforms are k·2⁻²⁴: u ∈ (0, 1)
    return (P_mean + P_std * torch.special.ndtri(lo + (1 - lo) * u)).exp()


def ect_stage(nimg: int, stage_kimg: float) -> int:
    """ECT stage ⌊nimg / (stage_kimg·1000)⌋ (0 at the start; +1 every ``stage_kimg`` thousand images)."""
    return int(nimg // (stage_kimg * 1000))


def ect_sigma_r(sigma_t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """ECT's sigmoid mapping, (B,) → (B,):
    σ_r = max(0, σ_t·(1 − q^{−(stage+1)}·(1 + k·sigmoid(−b·σ_t))))."""
    n = 1 + k * torch.sigmoid(-b * sigma_t)
    return (sigma_t * (1 - n / q ** (stage + 1))).clamp(min=0)


@objectives.register("ect", summary="Easy Consistency Tuning: discrete CT with a shrinking gap, 1-2 step sampling")
class ECT(Objective):
    """Discrete consistency training with ECT's shrinking-gap schedule (module docstring)."""

    Config = ECTConfig
    needs = ObjectiveNeeds(time_inputs=1, jvp=False, teacher="stopgrad", cfg="none", renoise=True)
    config: ECTConfig

    # -- the consistency function in EDM σ ---------------------------------------------------------
    def f(self, x_sigma: Tensor, sigma: Tensor, y: Tensor | None, net: nn.Module | None = None) -> Tensor:
        """f_θ(x_σ, σ): (B, C, H, W) EDM state and (B,) σ ≥ σ_min → (B, C, H, W) data estimate."""
        cfg = self.config
        return consistency_function(net if net is not None else self.backbone, x_sigma, sigma, y,
                                    sigma_data=cfg.sigma_data, sigma_min=cfg.sigma_min, sigma_p=SIGMA_P)

    def huber_c(self, x: Tensor) -> float:
        """Pseudo-Huber c for items shaped like x[0] (iCT's 0.00054·√dim unless configured)."""
        c = self.config.huber_c
        return 0.00054 * math.sqrt(x[0].numel()) if c is None else c

    def weight(self, sigma_t: Tensor, sigma_r: Tensor) -> Tensor:
        """λ(σ_t, σ_r), (B,): 1/(σ_t − σ_r) or 1/σ_t² + 1/σ_d²."""
        if self.config.weighting == "gap":
            return 1 / (sigma_t - sigma_r)
        if self.config.weighting == "snrpk":
            return 1 / sigma_t ** 2 + 1 / self.config.sigma_data ** 2
        raise ValueError(f"weighting must be 'gap' or 'snrpk', got {self.config.weighting!r}")

    # -- training -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """ECT loss on data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None`` after ``nimg`` images."""
        cfg = self.config
        sigma_t = truncated_lognormal(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_min, generator, x.device)
        sigma_t = sigma_t.to(x.dtype)
        eps = randn(tuple(x.shape), generator, x.device, x.dtype)
        stage = ect_stage(nimg, cfg.stage_kimg)
        sigma_r = ect_sigma_r(sigma_t, stage, cfg.q, cfg.k, cfg.b)
        return self.consistency_loss(x, y, eps, sigma_t, sigma_r, stage=stage)

    def consistency_loss(self, x: Tensor, y: Tensor | None, eps: Tensor, sigma_t: Tensor, sigma_r: Tensor,
                         stage: int = 0) -> LossOutput:
        """λ·d(f_θ(x + σ_t·ε, σ_t), sg f_θ(x + σ_r·ε, σ_r)) for given noise ε (B, C, H, W) and levels
        σ_t > σ_min, σ_t > σ_r ≥ 0 (B,); targets with σ_r ≤ σ_min are x + σ_min·ε (boundary condition)."""
        cfg = self.config
        rng = _rng_state(x.device)
        f_t = self.f(x + per_sample(sigma_t, x) * eps, sigma_t, y)
        boundary = sigma_r <= cfg.sigma_min
        sigma_r_min = sigma_r.clamp(min=cfg.sigma_min)
        target = x + per_sample(sigma_r_min, x) * eps         # = f(·, σ_min) where σ_r ≤ σ_min
        if not bool(boundary.all()):
            _set_rng_state(x.device, rng)                     # same dropout masks in the target pass
            with torch.no_grad():
                f_r = self.f(target, sigma_r_min, y)
            target = torch.where(per_sample(boundary, x), target, f_r.to(x.dtype))
        dt = torch.promote_types(x.dtype, torch.float32)    # fp32 loss (fp64 in float64 tests)
        diff = (f_t.to(dt) - target.to(dt)).flatten(1)
        c = self.huber_c(x)
        distance = (diff.square().sum(1) + c ** 2).sqrt() - c
        weight = self.weight(sigma_t, sigma_r).to(distance.dtype)
        loss = weight * distance
        gap_t = t_from_sigma(sigma_t, SIGMA_P) - t_from_sigma(sigma_r, SIGMA_P)
        logs = {"loss_ect": loss.detach().mean(), "distance": distance.detach().mean(),
                "weight": weight.detach().mean(), "stage": torch.tensor(float(stage), device=x.device),
                "gap_t": gap_t.detach().mean(), "boundary_frac": boundary.float().mean(),
                "nonfinite": (~torch.isfinite(loss.detach())).sum()}
        return LossOutput(loss=loss.mean(), per_sample=loss.detach(), logs=logs)

    def flops_per_sample(self, forward_flops: float) -> float:
        """4 F: grad forward (1 F) + its backward (2 F) + the no-grad target forward (1 F; skipped, so
        3 F, in the rare batches where every σ_r ≤ σ_min)."""
        return 4.0 * forward_flops

    # -- sampling -----------------------------------------------------------------------------------
    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """Jump to the data end and re-noise to s: x_s = (1 − s)·f_θ(x_σ, σ) + s·noise.

        Args:
            x: (B, C, H, W) state at toolkit times ``t`` (B,) in (0, 1]. For t < 1, x_σ = x_t/(1 − t) at
                σ(t); at t = 1 (pure noise z, σ = ∞) ECT's start: x_σ = σ_max·z at σ = σ_max.
            s: (B,) re-noise times ≤ t; s = 0 returns x̂₀ and needs no noise.
            noise: (B, C, H, W) fresh N(0, I) noise (required where s > 0).
        """
        if bool((t > 1).any()):
            raise ValueError(f"times must lie in [0, 1], got t up to {float(t.max())}")
        start = t >= 1                                             # pure noise: start at σ_max
        t_safe = torch.where(start, torch.zeros_like(t), t).to(x.dtype)
        sigma = torch.where(start, torch.full_like(t_safe, self.config.sigma_max), sigma_from_t(t_safe, SIGMA_P))
        x_sigma = torch.where(per_sample(start, x), self.config.sigma_max * x, x_sigma_from_x_t(x, t_safe))
        x0 = self.f(x_sigma, sigma, cond.y, net).to(x.dtype)
        if bool((s <= 0).all()):
            return x0
        if noise is None:
            raise ValueError("ECT re-noises between steps: step() needs noise where s > 0")
        s_ = per_sample(s, x).to(x.dtype)
        return (1 - s_) * x0 + s_ * noise.to(x.dtype)

    def default_schedule(self, nfe: int) -> list[float]:
        """[1, t(σ_1), …, t(σ_{nfe−1}), 0] with σ_i = σ_max·(σ_mid/σ_max)^{i/(nfe−1)} (σ_1 = σ_mid for
        nfe = 2, ECT's 2-step sampler); t(σ) = σ/(σ + 1). The first jump starts at σ_max (see :meth:`step`)."""
        if nfe < 1:
            raise ValueError(f"nfe must be ≥ 1, got {nfe}")
        cfg = self.config
        sigmas = [cfg.sigma_max * (cfg.sigma_mid / cfg.sigma_max) ** (i / (nfe - 1)) for i in range(1, nfe)]
        return [1.0] + [s / (s + SIGMA_P) for s in sigmas] + [0.0]


def _rng_state(device: torch.device) -> Tensor | None:
    """The global RNG state dropout would draw from on ``device`` (CPU or CUDA; ``None`` otherwise)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state() if device.type == "cpu" else None


def _set_rng_state(device: torch.device, state: Tensor | None) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
