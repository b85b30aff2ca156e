"""The DiT's explicit JVP: its blocks, final layer and whole forward with (primal, tangent) pairs.

``DiT(x, t, s, y, tangents=(tx, tt, ts), **cond)`` returns ``(F, ∂F·(tx, tt, ts))`` through these
functions, built from the layer rules of :mod:`fewstep.backbones.tangents` and the fused attention JVP
(:func:`fewstep.kernels.attention.attention_jvp`). Blocks are entered through their ``__call__`` so
module hooks (FSDP2 all-gathers) and per-block ``torch.compile`` apply to the JVP as to the forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.backbones.tangents import (Dual, gated_residual_jvp, gelu_tanh_jvp, linear_jvp, modulate_jvp,
                                        modulation_jvp, norm_jvp, recomputed)
from fewstep.backbones.layers import merge_heads, split_heads
from fewstep.kernels.attention import attention_jvp


def attention_module_jvp(attn: nn.Module, x: Tensor, tx: Tensor | None) -> Dual:
    """qkv → QK-norm → attention → proj, with tangents: x, tx (B, N, D)."""
    qkv, tqkv = linear_jvp(attn.qkv, x, tx)
    q, k, v = split_heads(qkv, attn.num_heads)                                        # 3 × (B, H, N, d)
    tq, tk, tv = split_heads(tqkv, attn.num_heads) if tqkv is not None else (None, None, None)
    q, tq = recomputed(norm_jvp, attn.q_norm, q, tq)
    k, tk = recomputed(norm_jvp, attn.k_norm, k, tk)
    o, to = attention_jvp(q, k, v, tq, tk, tv)                                       # (B, H, N, d)
    return linear_jvp(attn.proj, merge_heads(o), merge_heads(to) if to is not None else None)


def mlp_jvp(mlp: nn.Module, x: Tensor, tx: Tensor | None) -> Dual:
    """fc1 → GELU(tanh) → fc2 with tangents."""
    h, th = linear_jvp(mlp.fc1, x, tx)
    h, th = recomputed(gelu_tanh_jvp, h, th)
    return linear_jvp(mlp.fc2, h, th)


def _norm_modulate(norm: nn.Module, x: Tensor, tx: Tensor | None, shift: Tensor, tshift: Tensor | None,
                   scale: Tensor, tscale: Tensor | None) -> Dual:
    h, th = norm_jvp(norm, x, tx)
    return modulate_jvp(h, th, shift, tshift, scale, tscale)


def block_jvp(block: nn.Module, x: Tensor, c: Tensor, tx: Tensor | None, tc: Tensor | None) -> Dual:
    """One adaLN-Zero block: x, tx (B, N, D); c, tc (B, D)."""
    m, tm = modulation_jvp(block.adaLN_modulation, c, tc)                             # (B, 6, D)
    parts, tparts = m.unbind(1), (tm.unbind(1) if tm is not None else (None,) * 6)
    shift1, scale1, gate1, shift2, scale2, gate2 = parts
    tshift1, tscale1, tgate1, tshift2, tscale2, tgate2 = tparts
    h, th = recomputed(_norm_modulate, block.norm1, x, tx, shift1, tshift1, scale1, tscale1)
    a, ta = attention_module_jvp(block.attn, h, th)
    x, tx = gated_residual_jvp(x, tx, gate1, tgate1, a, ta)
    h, th = recomputed(_norm_modulate, block.norm2, x, tx, shift2, tshift2, scale2, tscale2)
    a, ta = mlp_jvp(block.mlp, h, th)
    return gated_residual_jvp(x, tx, gate2, tgate2, a, ta)


def final_layer_jvp(layer: nn.Module, x: Tensor, c: Tensor, tx: Tensor | None, tc: Tensor | None) -> Dual:
    """Pre-norm, (shift, scale) modulation, Linear(D → p²·C) with tangents."""
    m, tm = modulation_jvp(layer.adaLN_modulation, c, tc)
    shift, scale = m.unbind(1)
    tshift, tscale = tm.unbind(1) if tm is not None else (None, None)
    h, th = recomputed(_norm_modulate, layer.norm, x, tx, shift, tshift, scale, tscale)
    return linear_jvp(layer.linear, h, th)


def dit_jvp(net: nn.Module, x: Tensor, t: Tensor, s: Tensor | None, y: Tensor | None, cond: dict[str, Tensor],
            tangents: tuple[Tensor | None, Tensor | None, Tensor | None],
            head: str = "main") -> Dual | tuple[Tensor, Tensor, Tensor]:
    """``(F(x, t, s, y, cond), J·(tx, tt, ts))`` for a :class:`fewstep.backbones.dit.DiT` ``net``.

    Args:
        tangents: (tx (B, C, H, W), tt (B,), ts (B,)); ``None`` entries are zero. Labels and ``cond``
            (guidance, extra conditions) carry no tangent.
        head: ``main``, or ``both`` to also return the auxiliary head's output, computed from the
            shared trunk's primal only (no tangent through it).
    Returns:
        (out, tout), both (B, C, H, W) (``tout`` is zeros when every tangent is ``None``); with
        ``head="both"``, (out, tout, aux).
    """
    from fewstep.backbones.tangents import condition_vector_jvp

    tx, tt, ts = tangents
    h, th = linear_jvp(net.x_embedder, x, tx)
    h = net.tokens(h) + net.pos_embed                                                  # (B, N, D)
    th = None if th is None else net.tokens(th)
    (c0, tc0), (c1, tc1) = condition_vector_jvp(net, t, s, y, cond, tt, ts)

    def run(blocks, start: int, h: Tensor, th: Tensor | None, tangent: bool = True) -> Dual:
        for i, block in enumerate(blocks, start=start):
            c, tc = (c0, tc0) if i < net.split else (c1, tc1)
            tc = tc if tangent else None
            if th is None and tc is None:
                h = net.run_block(block, h, c)
            else:
                h, th = net.run_block(block, h, c, th, tc)
        return h, th

    trunk = net.config.depth - net.head_depth
    h, th = run(net.blocks[:trunk], 0, h, th)
    heads = net.heads()
    g, tg = run(heads[0][0], trunk, h, th)
    out, tout = (net.final_layer(g, c1), None) if tg is None and tc1 is None else net.final_layer(g, c1, tg, tc1)
    out = net.unpatchify(out)
    tout = torch.zeros_like(out) if tout is None else net.unpatchify(tout)
    if head != "both":
        return out, tout
    a, _ = run(heads[1][0], trunk, h, None, tangent=False)          # primal only: no tangent work
    return out, tout, net.unpatchify(net.aux_final_layer(a, c1))
