"""The explicit JVP attention as ``torch.library`` custom ops, so ``torch.compile`` keeps it whole.

``fewstep::jvp_attention(q, k, v, tq, tk, tv, scale, causal) → (O, tO, LSE, μ)`` runs the fused Triton
forward; ``fewstep::jvp_attention_backward`` the fused backward for whichever of ∂L/∂O, ∂L/∂tO exist.
Both have fake (meta) implementations with the kernels' exact output layouts (O and tO stored
(B, N, H, d)), and the forward has an autograd formula, so Dynamo traces through a DiT block without a
graph break and Inductor fuses everything around the call. :func:`jvp_attention_op` is the entry point:
it casts to the autocast dtype and gives the kernel unit-stride operands.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fewstep.kernels.jvp_attention import _check, _dtype, _prepare
from fewstep.kernels.jvp_launch import attention_backward, attention_forward, unit_stride


def _bnhd(q: Tensor) -> Tensor:
    B, H, N, d = q.shape
    return q.new_empty(B, N, H, d).transpose(1, 2)


@torch.library.custom_op("fewstep::jvp_attention", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, scale: float,
             causal: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    o, to, lse, mu = attention_forward(q, k, v, tq, tk, tv, scale=scale, causal=causal)
    return o, to, lse, mu


@_forward.register_fake
def _(q, k, v, tq, tk, tv, scale, causal):
    B, H, N, _ = q.shape
    lse = q.new_empty(B, H, N, 2, dtype=torch.float32)
    return _bnhd(q), _bnhd(q), lse, q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("fewstep::jvp_attention_backward", mutates_args=())
def _backward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, o: Tensor, to: Tensor,
              lse: Tensor, mu: Tensor, go: Tensor | None, gt: Tensor | None, scale: float,
              causal: bool) -> list[Tensor]:
    grads = attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, go, gt, scale=scale, causal=causal)
    return [g for g in grads if g is not None]


@_backward.register_fake
def _(q, k, v, tq, tk, tv, o, to, lse, mu, go, gt, scale, causal):
    n = 6 if gt is not None else 3     # the kernels write contiguous (B, H, L, d) gradients
    return [x.new_empty(x.shape) for x in (q, k, v, tq, tk, tv)[:n]]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, tq, tk, tv, scale, causal = inputs
    o, to, lse, mu = output
    ctx.save_for_backward(q, k, v, tq, tk, tv, o, to, lse, mu)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse, mu)
    ctx.set_materialize_grads(False)


def _autograd(ctx, go, gt, _glse, _gmu):
    if go is None and gt is None:
        return (None,) * 8
    q, k, v, tq, tk, tv, o, to, lse, mu = ctx.saved_tensors
    grads = _backward(q, k, v, tq, tk, tv, o, to, lse, mu,
                      None if go is None else unit_stride(go), None if gt is None else unit_stride(gt),
                      ctx.scale, ctx.causal)
    grads = list(grads) + [None] * (6 - len(grads))
    return (*grads, None, None)


_forward.register_autograd(_autograd, setup_context=_setup_context)


def jvp_attention_op(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, *,
                     scale: float | None = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Attention O = softmax(scale·QKᵀ)V and its tangent along (tq, tk, tv): (O, tO), both (B, H, N, d)
    in the operands' (or autocast) dtype, differentiable w.r.t. all six inputs.

    Shapes: q (B, H, N, d); k, v (B, H, M, d); tangents like their primals; d ≤ 256.
    """
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    args = _prepare(q, k, v, tq, tk, tv, dtype=_dtype(q))
    o, to, _, _ = _forward(*args, scale, bool(causal))
    return o, to
