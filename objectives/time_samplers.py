"""Two-time samplers for flow-map objectives: the (t, s) pairs a jump t → s ≤ t is trained on.

Convention: t = 1 is noise, t = 0 is data; a jump goes from t down to s ≤ t with gap g = t − s ≥ 0.

The *gap\\** sampler of Terminal Velocity Matching (Zhou et al. 2025, Table 3 / Fig. 9; ``docs/design/tvm.md``
§1.3, the official ``sample_ts``):

1. gap  g = σ(n), n ~ N(gap_mean, gap_std²)                        (logit-normal);
2. end  s ~ logit-normal(s_mean, s_std) truncated to s ≤ 1 − g, drawn by inverse CDF:
   ℓ = s_mean + s_std·Φ⁻¹(u·Φ((logit(1 − g) − s_mean)/s_std)), u ~ U(0, 1), s = σ(ℓ);
3. start t = min(s + g, 1);
4. FM time s′ ~ logit-normal(s_mean, s_std), independent of (t, s) (the "*").

With the defaults (−0.8, 1), (−0.4, 1): E t ≈ 0.687, E s ≈ 0.347, E g ≈ 0.340, E s′ ≈ 0.418 and
P(g > 0.5) = Φ(−0.8) ≈ 0.21 (docs/design/tvm.md §1.3 table).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.objectives.common import logit_normal, rand, randn


@dataclass
class TwoTimes:
    """A batch of training times, all (B,) floats in [0, 1].

    Attributes:
        t: start times (t = 1 noise).
        s: end times, s ≤ t.
        gap: the sampled gap g; t − s = g except where t was clamped to 1 (then t − s < g).
        s_prime: independent one-time draws (TVM's flow-matching time s′).
    """

    t: Tensor
    s: Tensor
    gap: Tensor
    s_prime: Tensor


def truncated_logit_normal(upper: Tensor, mean: float, std: float, generator: torch.Generator | None) -> Tensor:
    """Samples of σ(N(mean, std²)) conditioned on being ≤ ``upper``, by inverse CDF (one uniform each).

    Args:
        upper: (B,) per-sample upper bounds in [0, 1] (0 gives s = 0, 1 gives the untruncated law).
        mean, std: location and scale of the logit.
    Returns:
        (B,) samples in [0, upper], same dtype and device as ``upper``.
    """
    u = rand(upper.shape[0], generator, upper.device).to(upper.dtype)
    cap = torch.special.ndtr((torch.logit(upper) - mean) / std)        # Φ((logit(upper) − μ)/σ) ∈ [0, 1]
    return torch.sigmoid(mean + std * torch.special.ndtri(u * cap))


def gap_star(n: int, gap_mean: float = -0.8, gap_std: float = 1.0, s_mean: float = -0.4, s_std: float = 1.0,
             generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> TwoTimes:
    """TVM's gap* sampler (module docstring): n float32 draws of (t, s, g, s′).

    Randomness, in order: n normals (gap), n uniforms (truncated s), n normals (s′), all from
    ``generator`` (which must live on ``device``).
    """
    device = torch.device(device)
    gap = logit_normal(n, gap_mean, gap_std, generator, device)
    s = truncated_logit_normal(1 - gap, s_mean, s_std, generator)
    t = (s + gap).clamp(max=1.0)
    s_prime = torch.sigmoid(s_mean + s_std * randn((n,), generator, device))
    return TwoTimes(t=t, s=s, gap=gap, s_prime=s_prime)
