"""Forward-mode derivatives of the DiT's layers, written out: each ``*_jvp`` maps (primal, tangent) to
(output, output tangent).

Why by hand: ``torch.func.jvp`` wraps every tensor in a dual, dispatches each op through functorch and
launches a separate kernel per tangent term (the official TVM step runs ~28k kernels). Written out,
the tangent of a Linear is one more matmul with the same weight, norms and activations are a few
element-wise terms that ``torch.compile`` fuses into the primal's kernels, and attention is one call of
the fused Triton JVP kernel. The result is ordinary autograd code, so backward through the primal and
the tangent (TVM's ``detach_jvp: false``) needs nothing special.

Conventions: a tangent ``None`` means exactly zero (no work is done for it). Norms compute in ≥ fp32 as
their primals do (:func:`fewstep.backbones.layers.rms_norm`) and return the primal's dtype; under
autocast, matmuls run in the autocast dtype for primal and tangent alike. Shapes follow the primal:
tokens (B, N, D), conditioning (B, D).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.backbones.layers import (EPS, FREQUENCY_DIM, RMSNorm, TimestepEmbedder, timestep_embedding,
                                      timestep_frequencies)

Dual = tuple[Tensor, Tensor | None]
_GELU_C = math.sqrt(2.0 / math.pi)


def recomputed(fn: Callable[..., Dual], *args) -> Dual:
    """``fn(*args)`` for an element-wise tangent rule, its intermediates recomputed in backward instead
    of stored (eager autograd would keep every fp32 temporary of a norm's or GELU's tangent formula).
    Under ``torch.compile`` (Inductor decides what to keep) or without grad it is a plain call."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fn(*args)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def add(*terms: Tensor | None) -> Tensor | None:
    """Sum of the tangents that are not ``None`` (``None`` if all are)."""
    present = [x for x in terms if x is not None]
    if not present:
        return None
    total = present[0]
    for x in present[1:]:
        total = total + x
    return total


def mul(a: Tensor | None, b: Tensor) -> Tensor | None:
    """``a · b`` with ``None`` (zero) propagated."""
    return None if a is None else a * b


# ---------------------------------------------------------------------------------------------------
# Linear maps and activations
# ---------------------------------------------------------------------------------------------------
def linear_jvp(layer: nn.Linear | nn.Conv2d, x: Tensor, tx: Tensor | None) -> Dual:
    """``layer(x)`` and its tangent ``W·tx`` (no bias: the map is affine). x, tx: (..., in) alike."""
    if isinstance(layer, nn.Conv2d):
        tout = None if tx is None else F.conv2d(tx, layer.weight, None, layer.stride, layer.padding,
                                                layer.dilation, layer.groups)
        return layer(x), tout
    if tx is None:
        return layer(x), None
    if torch.compiler.is_compiling() and x.shape == tx.shape:
        # One GEMM on the stacked rows [x; tx]: Inductor writes the producers of x and tx straight into
        # the halves of one buffer, and the backward's weight gradient becomes one GEMM (xᵀg + txᵀg_t)
        # instead of two and a sum. The bias joins the primal half only, in the output dtype, so that it
        # fuses into the consumer. (In eager the concatenation would be a copy, so the two GEMMs stay.)
        out, tout = F.linear(torch.cat([x, tx]), layer.weight).chunk(2)
        return (out if layer.bias is None else out + layer.bias.to(out.dtype)), tout
    return layer(x), F.linear(tx, layer.weight)


def silu_jvp(x: Tensor, tx: Tensor | None) -> Dual:
    """SiLU(x) = x·σ(x); derivative σ(x)·(1 + x·(1 − σ(x)))."""
    sig = torch.sigmoid(x)
    return x * sig, mul(tx, sig * (1 + x * (1 - sig)))


def gelu_tanh_jvp(x: Tensor, tx: Tensor | None) -> Dual:
    """GELU, tanh approximation: ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³); derivative
    ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)."""
    if tx is None:
        return F.gelu(x, approximate="tanh"), None
    th = torch.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    out = 0.5 * x * (1 + th)
    slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
    return out, tx * slope


# ---------------------------------------------------------------------------------------------------
# Norms and modulation
# ---------------------------------------------------------------------------------------------------
def rms_norm_jvp(x: Tensor, tx: Tensor | None, weight: Tensor | None = None, eps: float = EPS) -> Dual:
    """y = x·r·w with r = (mean x² + eps)^(−½) over the last dim; dy = w·r·(dx − x̂·mean(x̂·dx)), x̂ = x·r."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    r = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    xhat = xf * r
    w = None if weight is None else weight.to(compute)
    y = xhat if w is None else xhat * w
    if tx is None:
        return y.to(x.dtype), None
    txf = tx.to(compute)
    ty = r * (txf - xhat * (xhat * txf).mean(dim=-1, keepdim=True))
    ty = ty if w is None else ty * w
    return y.to(x.dtype), ty.to(x.dtype)


def layer_norm_jvp(x: Tensor, tx: Tensor | None, eps: float) -> Dual:
    """y = (x − μ)·r, r = (var + eps)^(−½), no affine; dy = r·(dxc − y·mean(y·dxc)), dxc = dx − mean dx.

    Returns fp32 under autocast, as ``nn.LayerNorm`` does."""
    out_dtype = torch.promote_types(x.dtype, torch.float32) if torch.is_autocast_enabled(x.device.type) else x.dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xc = xf - xf.mean(dim=-1, keepdim=True)
    r = torch.rsqrt(xc.square().mean(dim=-1, keepdim=True) + eps)
    y = xc * r
    if tx is None:
        return y.to(out_dtype), None
    txf = tx.to(xf.dtype)
    dxc = txf - txf.mean(dim=-1, keepdim=True)
    ty = r * (dxc - y * (y * dxc).mean(dim=-1, keepdim=True))
    return y.to(out_dtype), ty.to(out_dtype)


def norm_jvp(norm: nn.Module, x: Tensor, tx: Tensor | None) -> Dual:
    """Tangent of a pre-norm, QK-norm or identity module of the DiT family."""
    if isinstance(norm, RMSNorm):
        return rms_norm_jvp(x, tx, norm.weight, norm.eps)
    if isinstance(norm, nn.LayerNorm):
        if norm.elementwise_affine:
            raise NotImplementedError("layer_norm_jvp covers LayerNorm without affine parameters only")
        return layer_norm_jvp(x, tx, norm.eps)
    if isinstance(norm, nn.Identity):
        return x, tx
    raise NotImplementedError(f"no tangent rule for {type(norm).__name__}")


def modulate_jvp(x: Tensor, tx: Tensor | None, shift: Tensor, tshift: Tensor | None, scale: Tensor,
                 tscale: Tensor | None) -> Dual:
    """x·(1 + scale) + shift with x (B, N, D), shift and scale (B, D):
    tangent tx·(1 + scale) + x·tscale + tshift."""
    scale1, shift1 = scale.unsqueeze(1), shift.unsqueeze(1)
    out = x * (1 + scale1) + shift1
    tout = add(mul(tx, 1 + scale1), mul(None if tscale is None else tscale.unsqueeze(1), x),
               None if tshift is None else tshift.unsqueeze(1))
    return out, tout


def gated_residual_jvp(x: Tensor, tx: Tensor | None, gate: Tensor, tgate: Tensor | None, a: Tensor,
                       ta: Tensor | None) -> Dual:
    """x + gate·a with gate (B, D), a (B, N, D): tangent tx + tgate·a + gate·ta."""
    gate1 = gate.unsqueeze(1)
    out = x + gate1 * a
    return out, add(tx, None if tgate is None else tgate.unsqueeze(1) * a, mul(ta, gate1))


def modulation_jvp(mod: nn.Module, c: Tensor, tc: Tensor | None) -> Dual:
    """adaLN head ``Linear(SiLU(c))`` split to (B, n, D), RMS-normalised per vector when ``mod_norm``."""
    a, ta = silu_jvp(c, tc)
    m, tm = linear_jvp(mod.linear, a, ta)
    m = m.unflatten(-1, (mod.n, -1))
    tm = None if tm is None else tm.unflatten(-1, (mod.n, -1))
    return rms_norm_jvp(m, tm) if mod.mod_norm else (m, tm)


# ---------------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------------
def timestep_embedder_jvp(emb: TimestepEmbedder, t: Tensor, tt: Tensor | None) -> Dual:
    """Sinusoid features [cos(a·ω), sin(a·ω)] of a = scale·t (float64, as the primal), their tangent
    [−sin(a·ω), cos(a·ω)]·ω·scale·tt, then Linear → SiLU → Linear."""
    features = timestep_embedding(t * emb.scale)
    dtype = emb.mlp[0].weight.dtype
    if tt is None:
        return emb.mlp(features.to(dtype)), None
    half = FREQUENCY_DIM // 2
    freqs = timestep_frequencies(FREQUENCY_DIM, device=t.device)
    rate = (tt.to(torch.float64) * emb.scale)[:, None] * freqs[None]             # d(a·ω)/dε
    cos, sin = features[:, :half], features[:, half:]
    tfeatures = torch.cat([-sin * rate, cos * rate], dim=-1)
    h, th = linear_jvp(emb.mlp[0], features.to(dtype), tfeatures.to(dtype))
    h, th = silu_jvp(h, th)
    return linear_jvp(emb.mlp[2], h, th)


def time_conditions_jvp(net: nn.Module, t: Tensor, s: Tensor | None, tt: Tensor | None,
                        ts: Tensor | None) -> tuple[Dual, Dual]:
    """:func:`fewstep.backbones.inputs.time_conditions` with tangents: ((c_early, tc_early), (c_late,
    tc_late)) along (tt, ts), for each ``time_mode``."""
    mode = net.time_mode
    if mode == "split":
        early = timestep_embedder_jvp(net.t_embedder, t, tt)
        if s is None:
            return early, early
        return early, timestep_embedder_jvp(net.t_embedder, s, ts)
    if mode == "h":
        if s is None:
            c = timestep_embedder_jvp(net.gap_embedder, torch.zeros_like(t), None)
        else:
            c = timestep_embedder_jvp(net.gap_embedder, t - s, add(tt, None if ts is None else -ts))
        return c, c
    c, tc = timestep_embedder_jvp(net.t_embedder, t, tt)
    if mode == "t+s" and net.gap_embedder is not None:
        g, tg = timestep_embedder_jvp(net.gap_embedder, t if s is None else s, tt if s is None else ts)
        c, tc = c + g, add(tc, tg)
    elif mode == "t+h" and net.gap_embedder is not None and s is not None:
        g, tg = timestep_embedder_jvp(net.gap_embedder, t - s, add(tt, None if ts is None else -ts))
        c, tc = c + g, add(tc, tg)
    return (c, tc), (c, tc)


def condition_vector_jvp(net: nn.Module, t: Tensor, s: Tensor | None, y: Tensor | None,
                         cond: dict[str, Tensor], tt: Tensor | None, ts: Tensor | None) -> tuple[Dual, Dual]:
    """((c_early, tc_early), (c_late, tc_late)): the conditioning vectors of
    :func:`fewstep.backbones.inputs.condition_vector` and their tangents along (tt, ts); guidance, extra
    conditions and labels carry no tangent."""
    from fewstep.backbones.inputs import fold, static_conditions

    early, late = time_conditions_jvp(net, t, s, tt, ts)
    terms = static_conditions(net, t.shape[0], y, cond, t.device)
    early_c = (fold(early[0], terms), early[1])
    return early_c, (early_c if late is early else (fold(late[0], terms), late[1]))
