"""Autograd wiring of the Triton JVP flash-attention kernels.

Two entry points, both O(N·d) memory, both correct in every mode:

* :func:`jvp_attention` — the explicit 6-in/2-out op ``(q, k, v, tq, tk, tv) → (O, tO)`` for callers
  that carry tangents themselves, the ``torch.library`` custom op of :mod:`fewstep.kernels.jvp_ops`.
  Forward is one fused pass (3F); the backward receives ∂L/∂O and ∂L/∂tO together and runs one fused
  backward specialised for which of them exist (10.5F with both).
* :func:`flash_attention` — ``(q, k, v) → O`` with a forward-AD rule, for ``torch.func.jvp`` and
  ``torch.autograd.forward_ad`` dual tensors. The forward is plain flash attention (F) and always gives
  a valid primal; the ``jvp`` rule adds the tangent with a tangent-only pass that reuses the saved LSE
  (2.5F). PyTorch gives the primal and the tangent separate backward nodes, so the backward is a
  gT-only pass (the tangent node, 9F) plus a flash backward (the primal node, 3.5F here).
  Inside :func:`detached_tangents` (or with ``detach_tangent=True``) the tangent is computed without a
  graph — the stop-gradient targets of sCM and MeanFlow — and costs no saved memory.

Shapes: q (B, H, N, d), k and v (B, H, M, d) (same d, same heads), tangents shaped like their
primals; outputs (B, H, N, d) in the input dtype. ``scale`` defaults to 1/√d; ``causal`` masks key j
for query i when ``j > i + M − N``. Operands are cast to one dtype (fp16, bf16 or fp32; under autocast,
the autocast dtype); fp32 accumulation throughout.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor

from fewstep.kernels.jvp_launch import attention_backward, attention_forward, unit_stride

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_detach_depth = 0


@contextlib.contextmanager
def detached_tangents(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`flash_attention`'s forward-AD rule returns tangents without a graph
    (``enabled=False`` is a no-op). Nests; not thread-local."""
    global _detach_depth
    _detach_depth += int(enabled)
    try:
        yield
    finally:
        _detach_depth -= int(enabled)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1]
            and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]):
        raise ValueError(f"JVP attention expects q (B, H, N, d), k and v (B, H, M, d), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"JVP attention supports fp16, bf16 and fp32, got {q.dtype}")


def _prepare(*xs: Tensor | None, dtype: torch.dtype) -> list[Tensor | None]:
    return [None if x is None else unit_stride(x.to(dtype)) for x in xs]


class _TangentAttention(torch.autograd.Function):
    """(q, k, v, tq, tk, tv | o, lse) → (tO, μ) given the primal's O and LSE (treated as constants:
    the gT-only backward differentiates tO through P, μ and every input directly)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, o, lse, scale, causal):
        _, to, _, mu = attention_forward(q, k, v, tq, tk, tv, scale=scale, causal=causal, o=o, lse=lse)
        return to, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, o, lse, scale, causal = inputs
        to, mu = output
        ctx.save_for_backward(q, k, v, tq, tk, tv, o, to, lse, mu)
        ctx.scale, ctx.causal = scale, causal
        ctx.mark_non_differentiable(mu)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gt, _gmu):
        if gt is None:
            return (None,) * 10
        q, k, v, tq, tk, tv, o, to, lse, mu = ctx.saved_tensors
        grads = attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, None, gt, scale=ctx.scale, causal=ctx.causal)
        return (*grads, None, None, None, None)


class _FlashAttention(torch.autograd.Function):
    """(q, k, v) → (O, LSE) with a forward-AD rule; LSE is a non-differentiable by-product."""

    @staticmethod
    def forward(q, k, v, scale, causal, detach):
        o, _, lse, _ = attention_forward(q, k, v, scale=scale, causal=causal)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, detach = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.detach = scale, causal, detach
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, go, _glse):
        if go is None:
            return (None,) * 6
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, *_ = attention_backward(q, k, v, None, None, None, o, None, lse, None, go, None,
                                            scale=ctx.scale, causal=ctx.causal)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v, o, lse = ctx.saved_tensors
        tq, tk, tv = (torch.zeros_like(p) if t is None else unit_stride(t.to(p.dtype))
                      for p, t in zip((q, k, v), (tq, tk, tv)))
        args = (q, k, v, tq, tk, tv, o, lse)
        if ctx.detach or _detach_depth > 0:   # (torch.no_grad is not honoured inside a jvp rule)
            args = tuple(x.detach() for x in args)
        # Through apply() in both modes: it unwraps functorch tensors before the kernel sees them.
        to, _ = _TangentAttention.apply(*args, ctx.scale, ctx.causal)
        return to, None


def _dtype(q: Tensor) -> torch.dtype:
    device = q.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return q.dtype


def jvp_attention(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, *,
                  scale: float | None = None, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Attention and its JVP along (tq, tk, tv), differentiable w.r.t. all six inputs: (O, tO).
    The custom op of :mod:`fewstep.kernels.jvp_ops` (so it also compiles)."""
    from fewstep.kernels.jvp_ops import jvp_attention_op

    return jvp_attention_op(q, k, v, tq, tk, tv, scale=scale, causal=causal)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False,
                    detach_tangent: bool = False) -> Tensor:
    """Flash attention O (B, H, N, d) that also works under ``torch.func.jvp`` and dual tensors, with
    gradients through the tangent unless ``detach_tangent`` (or :func:`detached_tangents`)."""
    _check(q, k, v)
    dtype = _dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = _prepare(q, k, v, dtype=dtype)
    o, _ = _FlashAttention.apply(q, k, v, scale, bool(causal), bool(detach_tangent))
    return o
