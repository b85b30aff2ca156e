"""Triton kernels of JVP flash attention: forward (primal, fused primal + tangent, tangent given LSE),
the O(N·d) backward preprocess, and the two backward passes (KV-stationary, Q-stationary).

Math (``docs/design/jvp-attention.md`` §1), per (batch, head), scale s, ``S = s·QKᵀ``,
``tS = s·(tQ Kᵀ + Q tKᵀ)``, ``P = softmax(S)``, ``μ = rowsum(P∘tS)`` (the tangent of the LSE):

* forward: ``O = P V``, ``tO = (P∘tS) V − μ∘O + P tV``, streamed over key tiles with a running max
  ``m``, sum ``l``, tangent sum ``r`` and accumulators ``A = Σ p̃ V``, ``T = Σ p̃ tV + (p̃∘tS) V``
  (§1.3): 6 matmuls per tile pair (3F). Given a saved LSE, ``P`` is exact in every tile and the
  tangent needs 5 matmuls and no rescaling.
* backward, upstream ``gO = ∂L/∂O`` and ``gT = ∂L/∂tO`` (§1.4), row statistics from the saved
  outputs only: ``δt = rowsum(gT∘O)``, ``D = rowsum(gO∘O) + rowsum(gT∘tO) − μ·δt``; per tile
  ``E = gT Vᵀ``, ``F = gO Vᵀ + gT tVᵀ``, ``dtS = P∘(E − δt)``, ``dS = P∘(F − μ∘E − D) + tS∘dtS``;
  ``dQ = s(dS K + dtS tK)``, ``dtQ = s·dtS K``, ``dK = s(dSᵀQ + dtSᵀtQ)``, ``dtK = s·dtSᵀQ``,
  ``dV = PᵀgO + tPᵀgT``, ``dtV = PᵀgT``. The KV kernel does 12 matmuls per tile pair, the Q kernel 9
  (10.5F); with ``gT`` absent both reduce to the flash-attention backward (``HAS_GT=False``), with
  ``gO`` absent the ``gO`` terms drop out (``HAS_GO=False``).

Layout: every (B, H, L, d) operand is passed as a pointer plus (batch, head, row) strides with a unit
stride along d, so permuted views (e.g. the DiT's fused qkv) need no copy. Row statistics (LSE, μ, δt,
D) are contiguous fp32 (B·H, L). The head dim d is covered by a power-of-two chunk ``D0`` plus an
optional second chunk ``D1`` (``HAS_D1``), so d = 72 runs as 64 + 16 (8 masked columns) instead of
padding to 128. Masks cover any N, M (tails), the causal mask (key j visible from query i when
``j ≤ i + M − N``) and fully masked rows (O = tO = μ = 0, LSE = +∞ so the backward sees P = 0).
Base-2 exponentials with ``qk_scale = s·log2 e`` folded in for S (tS stays in natural units). The
saved row statistic is the base-2 log-sum-exp kept as an unevaluated sum ``LSE₂ = m + log2 l``
(running max, log of the normaliser; (B, H, N, 2) fp32), and the backward recomputes
``P = 2^((S·qk_scale − m) − log2 l)``: a single fp32 LSE would round at ulp(|LSE₂|), a relative
error in P several times PyTorch's softmax; the split keeps fp32 parity.
"""
from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def _tile(base, rows, n_rows, stride, cols, n_cols):
    """Load a (len(rows), len(cols)) tile; out-of-range entries read 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _halves(base, rows, n_rows, stride, c0, c1, n_cols):
    """A row tile as its two head-dim chunks (columns ``c0``: the D0 chunk, ``c1``: the D1 chunk), each
    loaded as :func:`_tile` does."""
    return _tile(base, rows, n_rows, stride, c0, n_cols), _tile(base, rows, n_rows, stride, c1, n_cols)


@triton.jit
def _batch_head(H):
    """This program's batch·head index on grid axis 1, with its batch and head (int64, for offsets)."""
    bh = tl.program_id(1)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _store(base, value, rows, n_rows, stride, cols, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dot_t(a0, a1, b0, b1, HAS_D1: tl.constexpr, PREC: tl.constexpr):
    """a (R, d) · b (C, d)ᵀ → (R, C) fp32, summed over both head-dim chunks."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=PREC)
    if HAS_D1:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=PREC)
    return acc


@triton.jit
def _load_lse(LSE, bh, N, rows):
    """The (hi, lo) parts of the base-2 LSE of ``rows``; out-of-range rows read (+∞, 0)."""
    at = LSE + (bh * N + rows) * 2
    return (tl.load(at, mask=rows < N, other=float("inf")), tl.load(at + 1, mask=rows < N, other=0.0))


@triton.jit
def _visible(rows, cols, N, M, causal_shift, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) mask of query/key pairs that exist and are not causally masked."""
    ok = (rows[:, None] < N) & (cols[None, :] < M)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + causal_shift)
    return ok


@triton.jit
def _attn_fwd(Q, K, V, TQ, TK, TV, O, TO, LSE, MU,
              sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
              stq_b, stq_h, stq_n, stk_b, stk_h, stk_n, stv_b, stv_h, stv_n,
              so_b, so_h, so_n, sto_b, sto_h, sto_n,
              H, N, M, scale, qk_scale, causal_shift,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
              TANGENT: tl.constexpr, LSE_GIVEN: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile of one (batch, head). Modes: primal (``TANGENT=False``: O, LSE), fused
    (``TANGENT``: O, tO, LSE, μ) and tangent-only (``LSE_GIVEN``: reads O and LSE, writes tO, μ)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h = _batch_head(H)
    dtype = Q.dtype.element_ty
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    O += b * so_b + h * so_h
    q0, q1 = _halves(Q, rows, N, sq_n, c0, c1, HEAD_DIM)
    if TANGENT:
        TQ += b * stq_b + h * stq_h
        TK += b * stk_b + h * stk_h
        TV += b * stv_b + h * stv_h
        tq0, tq1 = _halves(TQ, rows, N, stq_n, c0, c1, HEAD_DIM)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    t0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    t1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LSE_GIVEN:
        m_i, z_i = _load_lse(LSE, bh, N, rows)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    hi = M
    if CAUSAL:
        hi = tl.minimum(M, start_m + BLOCK_M + causal_shift)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + cols
        k0, k1 = _halves(K, keys, M, sk_n, c0, c1, HEAD_DIM)
        ok = _visible(rows, keys, N, M, causal_shift, CAUSAL)
        s = tl.where(ok, _dot_t(q0, q1, k0, k1, HAS_D1, PREC) * qk_scale, float("-inf"))
        if LSE_GIVEN:
            p = tl.math.exp2(s - m_i[:, None] - z_i[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_ref)
            p = tl.math.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            m_i = m_new
        v0, v1 = _halves(V, keys, M, sv_n, c0, c1, HEAD_DIM)
        if not LSE_GIVEN:
            acc0 = tl.dot(p.to(dtype), v0, acc0, input_precision=PREC)
            if HAS_D1:
                acc1 = tl.dot(p.to(dtype), v1, acc1, input_precision=PREC)
        if TANGENT:
            tk0, tk1 = _halves(TK, keys, M, stk_n, c0, c1, HEAD_DIM)
            ts = _dot_t(tq0, tq1, k0, k1, HAS_D1, PREC) + _dot_t(q0, q1, tk0, tk1, HAS_D1, PREC)
            pts = p * tl.where(ok, ts * scale, 0.0)
            tv0, tv1 = _halves(TV, keys, M, stv_n, c0, c1, HEAD_DIM)
            if not LSE_GIVEN:
                r_i = r_i * alpha
                t0 = t0 * alpha[:, None]
                t1 = t1 * alpha[:, None]
            r_i += tl.sum(pts, 1)
            t0 = tl.dot(p.to(dtype), tv0, t0, input_precision=PREC)
            t0 = tl.dot(pts.to(dtype), v0, t0, input_precision=PREC)
            if HAS_D1:
                t1 = tl.dot(p.to(dtype), tv1, t1, input_precision=PREC)
                t1 = tl.dot(pts.to(dtype), v1, t1, input_precision=PREC)

    if LSE_GIVEN:   # P was exact in every tile: no normalisation; O comes from the primal pass
        o0 = _tile(O, rows, N, so_n, c0, HEAD_DIM).to(tl.float32)
        o1 = _tile(O, rows, N, so_n, c1, HEAD_DIM).to(tl.float32)
        mu = r_i
    else:
        empty = l_i == 0.0                      # fully masked row
        inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
        o0 = acc0 * inv_l[:, None]
        o1 = acc1 * inv_l[:, None]
        _store(O, o0, rows, N, so_n, c0, HEAD_DIM)
        if HAS_D1:
            _store(O, o1, rows, N, so_n, c1, HEAD_DIM)
        at = LSE + (bh * N + rows) * 2
        tl.store(at, tl.where(empty, float("inf"), m_i), mask=rows < N)
        tl.store(at + 1, tl.where(empty, 0.0, tl.math.log2(tl.where(empty, 1.0, l_i))), mask=rows < N)
        mu = r_i * inv_l
        t0 = t0 * inv_l[:, None]
        t1 = t1 * inv_l[:, None]
    if TANGENT:
        TO += b * sto_b + h * sto_h
        _store(TO, t0 - mu[:, None] * o0, rows, N, sto_n, c0, HEAD_DIM)
        if HAS_D1:
            _store(TO, t1 - mu[:, None] * o1, rows, N, sto_n, c1, HEAD_DIM)
        tl.store(MU + bh * N + rows, mu, mask=rows < N)


@triton.jit
def _attn_bwd_prep(O, TO, GO, GT, MU, DELTA_T, DELTA,
                   so_b, so_h, so_n, sto_b, sto_h, sto_n, sgo_b, sgo_h, sgo_n, sgt_b, sgt_h, sgt_n,
                   H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row statistics of the backward, O(N·d): δt = rowsum(gT∘O), D = rowsum(gO∘O) + rowsum(gT∘tO) − μ·δt."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh, b, h = _batch_head(H)
    c = tl.arange(0, BLOCK_D)
    o = _tile(O + b * so_b + h * so_h, rows, N, so_n, c, HEAD_DIM).to(tl.float32)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_GO:
        go = _tile(GO + b * sgo_b + h * sgo_h, rows, N, sgo_n, c, HEAD_DIM).to(tl.float32)
        delta += tl.sum(go * o, 1)
    if HAS_GT:
        gt = _tile(GT + b * sgt_b + h * sgt_h, rows, N, sgt_n, c, HEAD_DIM).to(tl.float32)
        to = _tile(TO + b * sto_b + h * sto_h, rows, N, sto_n, c, HEAD_DIM).to(tl.float32)
        mu = tl.load(MU + bh * N + rows, mask=rows < N, other=0.0)
        delta_t = tl.sum(gt * o, 1)
        delta += tl.sum(gt * to, 1) - mu * delta_t
        tl.store(DELTA_T + bh * N + rows, delta_t, mask=rows < N)
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
