"""Building blocks of the DiT family: norms, adaLN modulation, embedders, initialisers.

Everything here is JVP-safe: pure functions of the inputs, no in-place ops on activations, float
math promoted to fp32 where bf16 would lose precision (norms, sinusoids in float64).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

EPS = 1e-6
FREQUENCY_DIM = 256  # width of the sinusoidal time features


# ---------------------------------------------------------------------------------------------------
# Norms and modulation
# ---------------------------------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = EPS) -> Tensor:
    """``x / √(mean(x²) + eps) · weight`` over the last dim, computed in ≥ fp32, returned in x.dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    y = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; ``affine`` adds a learnable weight (init 1), no bias."""

    def __init__(self, dim: int, affine: bool = False, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: Literal["layernorm", "rmsnorm"], dim: int) -> nn.Module:
    """The pre-norm of blocks and the final layer: no affine parameters, eps 1e-6."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
    if kind == "rmsnorm":
        return RMSNorm(dim, affine=False)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x·(1 + scale) + shift``: x (B, N, D); shift, scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Modulation(nn.Module):
    """adaLN(-Zero) head: ``SiLU → Linear(D, n·D)``, split into n vectors of width D.

    With ``mod_norm`` (TVM's "semi-Lipschitz control") each vector is RMS-normalised over D (no
    weight, eps 1e-6), so after the first updates every shift/scale/gate has RMS ≈ 1. The zero
    vector maps to zero, so adaLN-Zero still starts as the identity.
    """

    def __init__(self, dim: int, n: int, mod_norm: bool = False):
        super().__init__()
        self.n, self.mod_norm = n, mod_norm
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, c: Tensor) -> Tensor:
        """c (B, D) → modulation vectors (B, n, D)."""
        m = self.linear(nn.functional.silu(c)).unflatten(-1, (self.n, -1))
        return rms_norm(m) if self.mod_norm else m


# ---------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------
def timestep_frequencies(dim: int = FREQUENCY_DIM, max_period: float = 10000.0,
                         device: torch.device | None = None) -> Tensor:
    """ω_i = max_period^(−i/(dim/2)), i < dim/2: (dim/2,) float64."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=device) / half)


def timestep_embedding(t: Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of scalars: t (B,) → (B, dim) float64, ``[cos(t·ω), sin(t·ω)]`` with
    ω from :func:`timestep_frequencies` (cos half first)."""
    freqs = timestep_frequencies(dim, max_period, t.device)
    args = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar (time, gap or guidance) → (B, D): ``Linear(256, D) → SiLU → Linear(D, D)`` on
    the sinusoid of ``scale·t`` (scale 1: raw [0, 1] values as TVM; 1000: original DiT)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_embedding(t * self.scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a grid×grid token map, row-major: (grid², dim)
    float64. The first half of the channels encodes the column, the second half the row; each half
    is ``[sin(pos·ω), cos(pos·ω)]`` with ω_i = 10000^(−i/(dim/4)). Needs dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")

    def one_axis(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1)


# ---------------------------------------------------------------------------------------------------
# Initialisers (in place, on parameters, under no_grad)
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def xavier_uniform_flat_(weight: Tensor) -> None:
    """Xavier-uniform on the weight viewed as (out, −1) (original DiT; convs treated flattened)."""
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


@torch.no_grad()
def spectral_init_(weight: Tensor) -> None:
    """Xavier-normal on the (out, −1) view, then divided by its largest singular value, so the
    flattened weight has spectral norm exactly 1 (TVM / LipsFormer "Lipschitz init").

    On the ``meta`` device this only records shapes; call the model's ``initialize_weights`` again
    after materialising it.
    """
    flat = weight.view(weight.shape[0], -1)
    nn.init.xavier_normal_(flat)
    if flat.is_meta:
        return
    sigma = torch.linalg.matrix_norm(flat.to(torch.promote_types(flat.dtype, torch.float32)), ord=2)
    flat.div_(sigma.to(flat.dtype))


# ---------------------------------------------------------------------------------------------------
# Attention heads (einops: the axes say what moves where)
# ---------------------------------------------------------------------------------------------------
def split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, N, 3·H·d) fused projections → q, k, v, each (B, H, N, d)."""
    return rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads).unbind(0)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, d) per-head outputs → (B, N, H·d)."""
    return rearrange(x, "b h n d -> b n (h d)")
