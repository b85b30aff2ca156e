"""Triton backward kernels of JVP flash attention (formulas in :mod:`fewstep.kernels.jvp_flash`).

Two deterministic passes (no atomics), both specialised at compile time on which upstream gradients
exist (``HAS_GO``: ∂L/∂O, ``HAS_GT``: ∂L/∂tO):

* :func:`_attn_bwd_kv` — one key tile per program, streaming over query tiles; accumulates dK, dV and
  (with ``HAS_GT``) dtK, dtV in fp32 registers. Works on transposed score tiles (Sᵀ = K Qᵀ), so the row
  statistics broadcast along columns. Matmuls per tile pair: 12 with both gradients, 4 with gO only.
* :func:`_attn_bwd_q` — one query tile per program, streaming over key tiles; accumulates dQ and (with
  ``HAS_GT``) dtQ. Matmuls per tile pair: 9 with both, 3 with gO only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fewstep.kernels.jvp_flash import _batch_head, _dot_t, _halves, _load_lse, _store, _visible


@triton.jit
def _attn_bwd_kv(Q, K, V, TQ, TK, TV, GO, GT, LSE, MU, DELTA_T, DELTA, DK, DV, DTK, DTV,
                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                 stq_b, stq_h, stq_n, stk_b, stk_h, stk_n, stv_b, stv_h, stv_n,
                 sgo_b, sgo_h, sgo_n, sgt_b, sgt_h, sgt_n, sd_b, sd_h, sd_n,
                 H, N, M, scale, qk_scale, causal_shift,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                 HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV, dtK, dtV of one key tile (DK, DV, DTK, DTV share the strides ``sd_*``)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh, b, h = _batch_head(H)
    dtype = Q.dtype.element_ty
    keys = start_n + tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    GO += b * sgo_b + h * sgo_h
    GT += b * sgt_b + h * sgt_h
    TQ += b * stq_b + h * stq_h
    k0, k1 = _halves(K, keys, M, sk_n, c0, c1, HEAD_DIM)
    v0, v1 = _halves(V, keys, M, sv_n, c0, c1, HEAD_DIM)
    if HAS_GT:
        tk0, tk1 = _halves(TK + b * stk_b + h * stk_h, keys, M, stk_n, c0, c1, HEAD_DIM)
        tv0, tv1 = _halves(TV + b * stv_b + h * stv_h, keys, M, stv_n, c0, c1, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dtk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dtk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dtv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dtv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    lo = 0
    if CAUSAL:   # queries i < start_n − (M − N) see none of these keys
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        in_n = rows < N
        q0, q1 = _halves(Q, rows, N, sq_n, c0, c1, HEAD_DIM)
        m, z = _load_lse(LSE, bh, N, rows)
        delta = tl.load(DELTA + bh * N + rows, mask=in_n, other=0.0)
        okT = (keys[:, None] < M) & (rows[None, :] < N)                 # (BLOCK_N, BLOCK_M)
        if CAUSAL:
            okT = okT & (keys[:, None] <= rows[None, :] + causal_shift)
        sT = _dot_t(k0, k1, q0, q1, HAS_D1, PREC) * qk_scale
        pT = tl.where(okT, tl.math.exp2(sT - m[None, :] - z[None, :]), 0.0)
        if HAS_GO:
            go0, go1 = _halves(GO, rows, N, sgo_n, c0, c1, HEAD_DIM)
            dv0 = tl.dot(pT.to(dtype), go0, dv0, input_precision=PREC)
            if HAS_D1:
                dv1 = tl.dot(pT.to(dtype), go1, dv1, input_precision=PREC)
            fT = _dot_t(v0, v1, go0, go1, HAS_D1, PREC)
        else:
            fT = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if HAS_GT:
            tq0, tq1 = _halves(TQ, rows, N, stq_n, c0, c1, HEAD_DIM)
            gt0, gt1 = _halves(GT, rows, N, sgt_n, c0, c1, HEAD_DIM)
            mu = tl.load(MU + bh * N + rows, mask=in_n, other=0.0)
            delta_t = tl.load(DELTA_T + bh * N + rows, mask=in_n, other=0.0)
            tsT = _dot_t(tk0, tk1, q0, q1, HAS_D1, PREC) + _dot_t(k0, k1, tq0, tq1, HAS_D1, PREC)
            tsT = tl.where(okT, tsT * scale, 0.0)
            tpT = pT * (tsT - mu[None, :])
            dv0 = tl.dot(tpT.to(dtype), gt0, dv0, input_precision=PREC)
            dtv0 = tl.dot(pT.to(dtype), gt0, dtv0, input_precision=PREC)
            if HAS_D1:
                dv1 = tl.dot(tpT.to(dtype), gt1, dv1, input_precision=PREC)
                dtv1 = tl.dot(pT.to(dtype), gt1, dtv1, input_precision=PREC)
            eT = _dot_t(v0, v1, gt0, gt1, HAS_D1, PREC)
            fT += _dot_t(tv0, tv1, gt0, gt1, HAS_D1, PREC)
            dtsT = pT * (eT - delta_t[None, :])
            dsT = pT * (fT - mu[None, :] * eT - delta[None, :]) + tsT * dtsT
            dk0 = tl.dot(dtsT.to(dtype), tq0, dk0, input_precision=PREC)
            dtk0 = tl.dot(dtsT.to(dtype), q0, dtk0, input_precision=PREC)
            if HAS_D1:
                dk1 = tl.dot(dtsT.to(dtype), tq1, dk1, input_precision=PREC)
                dtk1 = tl.dot(dtsT.to(dtype), q1, dtk1, input_precision=PREC)
        else:
            dsT = pT * (fT - delta[None, :])
        dk0 = tl.dot(dsT.to(dtype), q0, dk0, input_precision=PREC)
        if HAS_D1:
            dk1 = tl.dot(dsT.to(dtype), q1, dk1, input_precision=PREC)

    off = b * sd_b + h * sd_h
    _store(DK + off, dk0 * scale, keys, M, sd_n, c0, HEAD_DIM)
    _store(DV + off, dv0, keys, M, sd_n, c0, HEAD_DIM)
    if HAS_D1:
        _store(DK + off, dk1 * scale, keys, M, sd_n, c1, HEAD_DIM)
        _store(DV + off, dv1, keys, M, sd_n, c1, HEAD_DIM)
    if HAS_GT:
        _store(DTK + off, dtk0 * scale, keys, M, sd_n, c0, HEAD_DIM)
        _store(DTV + off, dtv0, keys, M, sd_n, c0, HEAD_DIM)
        if HAS_D1:
            _store(DTK + off, dtk1 * scale, keys, M, sd_n, c1, HEAD_DIM)
            _store(DTV + off, dtv1, keys, M, sd_n, c1, HEAD_DIM)


@triton.jit
def _attn_bwd_q(Q, K, V, TQ, TK, TV, GO, GT, LSE, MU, DELTA_T, DELTA, DQ, DTQ,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                stq_b, stq_h, stq_n, stk_b, stk_h, stk_n, stv_b, stv_h, stv_n,
                sgo_b, sgo_h, sgo_n, sgt_b, sgt_h, sgt_n, sd_b, sd_h, sd_n,
                H, N, M, scale, qk_scale, causal_shift,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ and dtQ of one query tile (DQ, DTQ share the strides ``sd_*``)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh, b, h = _batch_head(H)
    dtype = Q.dtype.element_ty
    rows = start_m + tl.arange(0, BLOCK_M)
    in_n = rows < N
    c0 = tl.arange(0, D0)
    c1 = D0 + tl.arange(0, D1)
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    TK += b * stk_b + h * stk_h
    TV += b * stv_b + h * stv_h
    q0, q1 = _halves(Q + b * sq_b + h * sq_h, rows, N, sq_n, c0, c1, HEAD_DIM)
    m, z = _load_lse(LSE, bh, N, rows)
    delta = tl.load(DELTA + bh * N + rows, mask=in_n, other=0.0)
    if HAS_GO:
        go0, go1 = _halves(GO + b * sgo_b + h * sgo_h, rows, N, sgo_n, c0, c1, HEAD_DIM)
    if HAS_GT:
        tq0, tq1 = _halves(TQ + b * stq_b + h * stq_h, rows, N, stq_n, c0, c1, HEAD_DIM)
        gt0, gt1 = _halves(GT + b * sgt_b + h * sgt_h, rows, N, sgt_n, c0, c1, HEAD_DIM)
        mu = tl.load(MU + bh * N + rows, mask=in_n, other=0.0)
        delta_t = tl.load(DELTA_T + bh * N + rows, mask=in_n, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    dtq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dtq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    hi = M
    if CAUSAL:
        hi = tl.minimum(M, start_m + BLOCK_M + causal_shift)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k0, k1 = _halves(K, keys, M, sk_n, c0, c1, HEAD_DIM)
        v0, v1 = _halves(V, keys, M, sv_n, c0, c1, HEAD_DIM)
        ok = _visible(rows, keys, N, M, causal_shift, CAUSAL)
        s = _dot_t(q0, q1, k0, k1, HAS_D1, PREC) * qk_scale
        p = tl.where(ok, tl.math.exp2(s - m[:, None] - z[:, None]), 0.0)
        if HAS_GO:
            f = _dot_t(go0, go1, v0, v1, HAS_D1, PREC)
        else:
            f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_GT:
            tk0, tk1 = _halves(TK, keys, M, stk_n, c0, c1, HEAD_DIM)
            tv0, tv1 = _halves(TV, keys, M, stv_n, c0, c1, HEAD_DIM)
            ts = _dot_t(tq0, tq1, k0, k1, HAS_D1, PREC) + _dot_t(q0, q1, tk0, tk1, HAS_D1, PREC)
            ts = tl.where(ok, ts * scale, 0.0)
            e = _dot_t(gt0, gt1, v0, v1, HAS_D1, PREC)
            f += _dot_t(gt0, gt1, tv0, tv1, HAS_D1, PREC)
            dts = p * (e - delta_t[:, None])
            ds = p * (f - mu[:, None] * e - delta[:, None]) + ts * dts
            dq0 = tl.dot(dts.to(dtype), tk0, dq0, input_precision=PREC)
            dtq0 = tl.dot(dts.to(dtype), k0, dtq0, input_precision=PREC)
            if HAS_D1:
                dq1 = tl.dot(dts.to(dtype), tk1, dq1, input_precision=PREC)
                dtq1 = tl.dot(dts.to(dtype), k1, dtq1, input_precision=PREC)
        else:
            ds = p * (f - delta[:, None])
        dq0 = tl.dot(ds.to(dtype), k0, dq0, input_precision=PREC)
        if HAS_D1:
            dq1 = tl.dot(ds.to(dtype), k1, dq1, input_precision=PREC)

    off = b * sd_b + h * sd_h
    _store(DQ + off, dq0 * scale, rows, N, sd_n, c0, HEAD_DIM)
    if HAS_D1:
        _store(DQ + off, dq1 * scale, rows, N, sd_n, c1, HEAD_DIM)
    if HAS_GT:
        _store(DTQ + off, dtq0 * scale, rows, N, sd_n, c0, HEAD_DIM)
        if HAS_D1:
            _store(DTQ + off, dtq1 * scale, rows, N, sd_n, c1, HEAD_DIM)
