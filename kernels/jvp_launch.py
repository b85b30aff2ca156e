"""Host side of the Triton JVP flash-attention kernels: tile configurations, argument packing, launches.

Functions here take plain tensors and return plain tensors (no autograd); the autograd wiring is in
:mod:`fewstep.kernels.jvp_attention`. All operands are (B, H, L, d) with a unit stride along d (other
strides arbitrary), one dtype among fp16/bf16/fp32; row statistics are fp32 (B, H, L).

Tile sizes are autotuned on CUDA (keyed on lengths, head dim, dtype and mode; ``FEWSTEP_JVP_AUTOTUNE=0``
keeps the first and the small fallback configuration, for quick compiles in tests); under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) one small configuration is used.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from fewstep.kernels import jvp_flash, jvp_flash_bwd

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634   # log2(e): the kernels' exponentials are base 2
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("FEWSTEP_JVP_AUTOTUNE", "1") != "0"   # 0: first + fallback configuration (fast compiles)


def _configs(pairs: list[tuple[int, int, int, int]], a: str, b: str) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({a: 32, b: 16}, num_warps=1, num_stages=1)]
    chosen = pairs if AUTOTUNE or len(pairs) < 2 else [pairs[0], pairs[-1]]   # the last one is the small fallback
    return [triton.Config({a: x, b: y}, num_warps=w, num_stages=s) for x, y, w, s in chosen]


# Candidates measured on an H100 (scripts/jvp-config-sweep.sh; B32 H16 N256 d72, bf16). The fused
# forward keeps BLOCK_N = 32: with Triton 3.6 on Hopper, BLOCK_N ≥ 64 gave a wrong tangent (relative
# error 0.4; the interpreter is exact with the same tiles) and two such tiles faulted, so they are
# excluded; the tests run every kernel against float64 on the GPU too. The first candidate of each is the
# fastest at the DiT shapes; the last is a small fallback that fits fp32 operands at d = 128 in shared
# memory (the autotuner skips candidates that do not fit).
_FWD = triton.autotune(
    _configs([(64, 32, 4, 3), (32, 32, 4, 1)], "BLOCK_M", "BLOCK_N"),
    key=["N", "M", "HEAD_DIM", "TANGENT", "LSE_GIVEN", "CAUSAL", "PREC"])(jvp_flash._attn_fwd)
_BWD_KV = triton.autotune(
    _configs([(64, 32, 4, 3), (128, 32, 8, 2), (32, 32, 4, 2)], "BLOCK_N", "BLOCK_M"),
    key=["N", "M", "HEAD_DIM", "HAS_GO", "HAS_GT", "CAUSAL", "PREC"])(jvp_flash_bwd._attn_bwd_kv)
_BWD_Q = triton.autotune(
    _configs([(64, 32, 4, 3), (128, 32, 8, 2), (32, 32, 4, 2)], "BLOCK_M", "BLOCK_N"),
    key=["N", "M", "HEAD_DIM", "HAS_GO", "HAS_GT", "CAUSAL", "PREC"])(jvp_flash_bwd._attn_bwd_q)
COMPILED: dict[str, tuple] = {}   # kernel name → (compiled kernel, chosen config) of its latest launch


def _record(name: str, tuner, compiled) -> None:
    COMPILED[name] = (compiled, getattr(tuner, "best_config", None))


@dataclass(frozen=True)
class HeadDim:
    """How a head dim d is covered by power-of-two chunks: ``D0`` plus, when ``has_d1``, ``D1``
    (both ≥ 16, the smallest ``tl.dot`` width). d = 64 → 64; d = 72 → 64 + 16; d = 8 → 16."""

    d: int
    D0: int
    D1: int
    has_d1: bool

    @staticmethod
    def of(d: int) -> "HeadDim":
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"JVP attention supports head dims 1–{MAX_HEAD_DIM}, got {d}")
        d0 = max(16, 1 << (d.bit_length() - 1))
        rest = d - d0
        if rest <= 0:
            return HeadDim(d, d0, 16, False)
        return HeadDim(d, d0, max(16, 1 << (rest - 1).bit_length()), True)

    def meta(self) -> dict:
        return dict(HEAD_DIM=self.d, D0=self.D0, D1=self.D1, HAS_D1=self.has_d1)


def _strides(x: Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if x is None else (x.stride(0), x.stride(1), x.stride(2))


def unit_stride(x: Tensor) -> Tensor:
    """``x`` with a unit stride along the last dim (a copy only when needed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def precision(x: Tensor) -> str:
    """``tl.dot`` input precision: IEEE fp32 for fp32 operands unless PyTorch allows TF32 matmuls."""
    if x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _empty_bnhd(B: int, H: int, N: int, d: int, like: Tensor) -> Tensor:
    """(B, H, N, d) stored as (B, N, H, d): ``.transpose(1, 2).reshape(B, N, H·d)`` is then free."""
    return torch.empty(B, N, H, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                      tv: Tensor | None = None, *, scale: float, causal: bool = False,
                      o: Tensor | None = None, lse: Tensor | None = None
                      ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """Forward pass in one of three modes.

    * primal (no tangents): returns (O, None, LSE, None) — flash attention, F.
    * fused (tangents, no ``lse``): (O, tO, LSE, μ) in one pass — 3F.
    * tangent-only (tangents and the primal's ``o``, ``lse``): (o, tO, lse, μ) — 2.5F, no rescaling.

    Shapes: q (B, H, N, d), k and v (B, H, M, d), tangents like their primals; O, tO (B, H, N, d) in the
    input dtype (stored (B, N, H, d)); the base-2 log-sum-exp as an unevaluated sum, fp32 (B, H, N, 2)
    with LSE = (lse[..., 0] + lse[..., 1]) · ln 2 (see :func:`natural_lse`; +∞ on fully masked rows);
    μ = tangent of the LSE, fp32 (B, H, N).
    """
    B, H, N, d = q.shape
    M = k.shape[2]
    tangent = tq is not None
    lse_given = lse is not None
    if lse_given and (o is None or not tangent):
        raise ValueError("tangent-only forward needs the tangents and the primal's o and lse")
    out = o if lse_given else _empty_bnhd(B, H, N, d, q)
    lse = lse if lse_given else torch.empty(B, H, N, 2, dtype=torch.float32, device=q.device)
    tout = _empty_bnhd(B, H, N, d, q) if tangent else None
    mu = torch.empty(B, H, N, dtype=torch.float32, device=q.device) if tangent else None
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    compiled = _FWD[grid](q, k, v, tq if tangent else q, tk if tangent else k, tv if tangent else v,
               out, tout if tangent else out, lse, mu if tangent else lse,
               *_strides(q), *_strides(k), *_strides(v), *_strides(tq), *_strides(tk), *_strides(tv),
               *_strides(out), *_strides(tout),
               H, N, M, float(scale), float(scale) * LOG2E, M - N,
               **HeadDim.of(d).meta(), TANGENT=tangent, LSE_GIVEN=lse_given, CAUSAL=bool(causal),
               PREC=precision(q))
    _record("fwd-tangent" if lse_given else "fwd-fused" if tangent else "fwd-primal", _FWD, compiled)
    return out, tout, lse, mu


def attention_backward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                       tv: Tensor | None, o: Tensor, to: Tensor | None, lse: Tensor, mu: Tensor | None,
                       go: Tensor | None, gt: Tensor | None, *, scale: float, causal: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``L = ⟨gO, O⟩ + ⟨gT, tO⟩`` w.r.t. (q, k, v, tq, tk, tv).

    ``go`` or ``gt`` may be None (that term is absent; the kernels are specialised for it). The tangent
    gradients are None when ``gt`` is None (they are exactly zero then). Shapes as in
    :func:`attention_forward`; gradients have their input's shape and dtype.
    """
    has_go, has_gt = go is not None, gt is not None
    if not (has_go or has_gt):
        raise ValueError("attention_backward needs at least one of go, gt")
    if has_gt and (tq is None or to is None or mu is None):
        raise ValueError("a tangent gradient needs the tangents, tO and μ")
    B, H, N, d = q.shape
    M = k.shape[2]
    go = unit_stride(go) if has_go else None
    gt = unit_stride(gt) if has_gt else None
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    delta_t = torch.empty_like(delta) if has_gt else delta
    block_d = max(16, triton.next_power_of_2(d))
    prep_m = 32 if INTERPRET else max(16, min(128, 8192 // block_d))
    jvp_flash._attn_bwd_prep[(triton.cdiv(N, prep_m), B * H)](
        o, to if has_gt else o, go if has_go else o, gt if has_gt else o, mu if has_gt else delta, delta_t, delta,
        *_strides(o), *_strides(to), *_strides(go), *_strides(gt),
        H, N, HEAD_DIM=d, BLOCK_D=block_d, HAS_GO=has_go, HAS_GT=has_gt, BLOCK_M=prep_m)

    dq = torch.empty(B, H, N, d, dtype=q.dtype, device=q.device)
    dtq = torch.empty_like(dq) if has_gt else None
    dk, dv = (torch.empty(B, H, M, d, dtype=q.dtype, device=q.device) for _ in range(2))
    dtk, dtv = (torch.empty_like(dk) for _ in range(2)) if has_gt else (None, None)
    tq_, tk_, tv_ = (tq, tk, tv) if has_gt else (q, k, v)
    go_, gt_ = go if has_go else gt, gt if has_gt else go
    mu_, delta_t_ = (mu, delta_t) if has_gt else (delta, delta)
    common = (H, N, M, float(scale), float(scale) * LOG2E, M - N)
    meta = dict(**HeadDim.of(d).meta(), HAS_GO=has_go, HAS_GT=has_gt, CAUSAL=bool(causal), PREC=precision(q))
    operands = (*_strides(q), *_strides(k), *_strides(v), *_strides(tq_), *_strides(tk_), *_strides(tv_),
                *_strides(go_), *_strides(gt_))
    mode = "both" if has_go and has_gt else "gO" if has_go else "gT"
    compiled = _BWD_KV[lambda meta_: (triton.cdiv(M, meta_["BLOCK_N"]), B * H)](
        q, k, v, tq_, tk_, tv_, go_, gt_, lse, mu_, delta_t_, delta,
        dk, dv, dtk if has_gt else dk, dtv if has_gt else dv, *operands, *_strides(dk), *common, **meta)
    _record(f"bwd-kv-{mode}", _BWD_KV, compiled)
    compiled = _BWD_Q[lambda meta_: (triton.cdiv(N, meta_["BLOCK_M"]), B * H)](
        q, k, v, tq_, tk_, tv_, go_, gt_, lse, mu_, delta_t_, delta,
        dq, dtq if has_gt else dq, *operands, *_strides(dq), *common, **meta)
    _record(f"bwd-q-{mode}", _BWD_Q, compiled)
    return dq, dk, dv, dtq, dtk, dtv


def natural_lse(lse: Tensor) -> Tensor:
    """The kernels' (B, H, N, 2) base-2 split statistic → the natural log-sum-exp (B, H, N)."""
    return (lse[..., 0].double() + lse[..., 1].double()) * math.log(2)
