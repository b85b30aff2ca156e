"""Diffusion Transformer (Peebles & Xie, 2023) with TVM's "semi-Lipschitz control" switches.

``F(x, t, s, y, guidance, **conditions)``: patchify → transformer blocks with adaLN-Zero modulation →
final layer → unpatchify. The variant switches of Terminal Velocity Matching (Zhou et al., 2025; see
``docs/design/tvm.md`` §2) are config fields: RMSNorm pre-norms, QK-norm, RMS-normalised modulation,
spectral init, and separate embedders for the gap ``t − s`` and the guidance input. The frontier
objectives' needs are config of the same family (docs/design/frontier.md §1): how the two times are
embedded (``time_mode``: t + gap, gap only, t + s, or t for early blocks and s for late ones), extra
scalar conditions with their own embedders (``conditions``) and an auxiliary output head sharing the
trunk (``aux_head``). Flavours (``dit-debug`` … ``dit-xl``) are registered in
:data:`fewstep.registry.backbones`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from fewstep.backbones.dit_tangents import block_jvp, dit_jvp, final_layer_jvp
from fewstep.backbones.inputs import TIME_MODES, check_conditioning, condition_vector, split_index
from fewstep.backbones.layers import (FREQUENCY_DIM, Modulation, RMSNorm, TimestepEmbedder, make_norm,
                                      merge_heads, modulate, sincos_pos_embed_2d, spectral_init_, split_heads,
                                      xavier_uniform_flat_)
from fewstep.config import BackboneConfig, require
from fewstep.contracts import DataSpec
from fewstep.kernels.attention import attention
from fewstep.registry import backbones


def family_checks(cfg: BackboneConfig) -> list[tuple[bool, str]]:
    """Single-field checks of the conditioning switches shared by the DiT and the MLP (cross-field ones
    run when the model is built, so ``--set`` may pass through intermediate states)."""
    names = list(cfg.conditions)
    return [
        (cfg.time_mode in TIME_MODES, f"time_mode must be one of {', '.join(TIME_MODES)}, got {cfg.time_mode!r}"),
        (cfg.split_depth is None or cfg.split_depth >= 0, f"split_depth must be ≥ 0, got {cfg.split_depth}"),
        (cfg.aux_head_depth is None or cfg.aux_head_depth >= 1,
         f"aux_head_depth must be ≥ 1, got {cfg.aux_head_depth}"),
        (all(n.isidentifier() and n not in ("guidance", "tangents", "head") for n in names)
         and len(set(names)) == len(names),
         f"conditions must be distinct identifiers other than guidance, tangents and head, got {names}"),
    ]


def check_family_build(cfg: BackboneConfig, kind: str, depth: int) -> None:
    """Cross-field checks of the conditioning switches, when a ``kind`` model of ``depth`` blocks is built."""
    if cfg.time_mode == "h" and not cfg.gap_embedder:
        raise ValueError(f"{kind}: time_mode 'h' embeds only the gap t − s; set gap_embedder=true (the trainer does "
                         f"for two-time objectives)")
    if cfg.time_mode == "split" and cfg.split_depth is not None and cfg.split_depth > depth:
        raise ValueError(f"{kind}: split_depth {cfg.split_depth} exceeds the depth {depth}")
    if cfg.aux_head and aux_depth(cfg, depth) > depth:
        raise ValueError(f"{kind}: aux_head_depth {cfg.aux_head_depth} exceeds the depth {depth}")


def aux_depth(cfg: BackboneConfig, depth: int) -> int:
    """Blocks per output head when ``aux_head`` (0 without one): ``aux_head_depth`` or max(1, depth // 6)."""
    if not cfg.aux_head:
        return 0
    return cfg.aux_head_depth if cfg.aux_head_depth is not None else max(1, depth // 6)


@dataclass(kw_only=True)
class ConditioningConfig(BackboneConfig):
    """The conditioning switches of every fewstep backbone (the DiT and the point MLP); the trainer sets
    them from the objective's needs (:func:`fewstep.build.resolve`).

    Attributes:
        gap_embedder: the backbone takes a second time s (two-time objectives); with ``time_mode`` t+h
            or h a second sinusoidal MLP embeds the gap t − s, with t+s it embeds s, with split there is
            no second embedder.
        guidance_embedder: embed a per-sample guidance scalar (TVM feeds β = 1/w).
        time_scale: times, gaps and guidance are multiplied by this before the sinusoid (1: raw [0, 1]
            as TVM; 1000: original DiT).
        time_mode: how a two-time call embeds (t, s): ``t+h``, ``h``, ``t+s`` or ``split``
            (:data:`fewstep.backbones.inputs.TIME_MODES`).
        split_depth: with ``split``, blocks 0 … split_depth − 1 see t and the rest (and the final layer)
            see s; ``None``: round(0.7·depth) (DMF: 20 of 28).
        conditions: names of extra per-sample scalar conditions, each embedded by its own sinusoidal MLP
            and added to the conditioning (iMF: ``omega``, ``t_min``, ``t_max``).
        aux_head: a second output head (``head="aux"`` or ``"both"``): the last ``aux_head_depth`` blocks
            and the final layer are duplicated, the blocks before them are shared (iMF's v-head).
        aux_head_depth: blocks per head; ``None``: max(1, depth // 6) (iMF XL/2: 8 of 48).
    """

    gap_embedder: bool = False
    guidance_embedder: bool = False
    time_scale: float = 1.0
    time_mode: Literal["t+h", "h", "t+s", "split"] = "t+h"
    split_depth: int | None = None
    conditions: tuple[str, ...] = ()
    aux_head: bool = False
    aux_head_depth: int | None = None


@dataclass(kw_only=True)
class DiTConfig(ConditioningConfig):
    """DiT architecture. Defaults are DiT-S/2 as in the original paper (xavier init, LayerNorm).

    Attributes:
        depth, hidden_size, num_heads: blocks, width D and attention heads (D % heads == 0).
        patch_size: p; the input side must be divisible by it (2, 4 or 8 in the paper).
        mlp_ratio: MLP hidden width / D.
        norm: block and final pre-norms, without affine parameters, eps 1e-6.
        qk_norm: RMSNorm over head_dim on q and k, learnable weight (init 1), eps 1e-6.
        mod_norm: RMS-normalise each adaLN modulation vector over D (no weight, eps 1e-6).
        init: ``xavier`` (uniform, original DiT), ``spectral`` (xavier-normal ÷ largest singular
            value, TVM as written) or ``spectral-released`` (the effective init of the released TVM
            code: ``spectral`` except the patch conv, which keeps its unnormalised xavier-normal
            weight, largest singular value ≈ 1.5; see docs/design/tvm-init.md). The patch conv is
            treated flattened; biases 0.
        time_init: time/gap/guidance MLPs ``normal`` N(0, 0.02) or ``spectral``; ``spectral-released``
            needs ``normal`` (the released code's spectral time init never reaches the model).
        gap_embedder … aux_head_depth: the conditioning switches (:class:`ConditioningConfig`).
    """

    name: str = "dit-s"
    depth: int = 12
    hidden_size: int = 384
    num_heads: int = 6
    patch_size: int = 2
    mlp_ratio: float = 4.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False
    mod_norm: bool = False
    init: Literal["xavier", "spectral", "spectral-released"] = "xavier"
    time_init: Literal["normal", "spectral"] = "normal"

    def __post_init__(self) -> None:
        checks = [
            (self.depth >= 1, f"depth must be ≥ 1, got {self.depth}"),
            *family_checks(self),
            (self.num_heads >= 1 and self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"),
            (self.hidden_size % 4 == 0, f"hidden_size must be divisible by 4 (2-D sin-cos position "
                                        f"embedding), got {self.hidden_size}"),
            (self.patch_size >= 1, f"patch_size must be ≥ 1, got {self.patch_size}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.init in ("xavier", "spectral", "spectral-released"),
             f"init must be 'xavier', 'spectral' or 'spectral-released', got {self.init!r}"),
            (self.time_init in ("normal", "spectral"),
             f"time_init must be 'normal' or 'spectral', got {self.time_init!r}"),
            (not (self.init == "spectral-released" and self.time_init == "spectral"),
             "init='spectral-released' reproduces the released TVM code, whose time/gap/guidance MLPs start "
             "N(0, 0.02) (its time_specinit never reaches the model); set time_init='normal', or init='spectral' "
             "for spectral time MLPs"),
            (self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}"),
        ]
        require(checks, "DiTConfig")

    def build(self, data: DataSpec) -> "DiT":
        """A freshly initialised DiT for items of ``data`` (channels, resolution, classes)."""
        return DiT(self, in_channels=data.channels, input_size=data.resolution, num_classes=data.num_classes)


def tvm_variant(cfg: DiTConfig) -> DiTConfig:
    """TVM's improved architecture on top of ``cfg``'s size: RMSNorm, QK-norm, modulation norm,
    spectral init, gap and guidance embedders, raw time inputs; XL (width 1152) gets 18 heads
    (head_dim 64). ``time_init`` is kept: the released TVM code effectively used N(0, 0.02)."""
    heads = 18 if cfg.hidden_size == 1152 else cfg.num_heads
    return dataclasses.replace(cfg, norm="rmsnorm", qk_norm=True, mod_norm=True, init="spectral",
                               gap_embedder=True, guidance_embedder=True, time_scale=1.0,
                               num_heads=heads)


# ---------------------------------------------------------------------------------------------------
# Core blocks
# ---------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention: qkv Linear (bias) → optional QK-norm → :func:`attention` → proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, D) → (B, N, D)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)                     # (B, H, N, d) each
        out = attention(self.q_norm(q), self.k_norm(k), v)                     # (B, H, N, d)
        return self.proj(merge_heads(out))


class Mlp(nn.Module):
    """fc1 (D → hidden) → GELU(tanh) → fc2 (hidden → D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: six modulation vectors (shift, scale, gate) × 2."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm, D)
        self.attn = Attention(D, cfg.num_heads, cfg.qk_norm)
        self.norm2 = make_norm(cfg.norm, D)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = Modulation(D, 6, cfg.mod_norm)

    def forward(self, x: Tensor, c: Tensor, tx: Tensor | None = None,
                tc: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """x (B, N, D), c (B, D) → (B, N, D); with tangents tx (B, N, D) and/or tc (B, D), the pair
        (out, tangent out) (:func:`fewstep.backbones.dit_tangents.block_jvp`)."""
        if tx is not None or tc is not None:
            return block_jvp(self, x, c, tx, tc)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).unbind(1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Pre-norm, 2-vector modulation (shift, scale), Linear(D → p²·C) (zero-initialised)."""

    def __init__(self, cfg: DiTConfig, out_dim: int):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.hidden_size)
        self.adaLN_modulation = Modulation(cfg.hidden_size, 2, cfg.mod_norm)
        self.linear = nn.Linear(cfg.hidden_size, out_dim)

    def forward(self, x: Tensor, c: Tensor, tx: Tensor | None = None,
                tc: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """x (B, N, D), c (B, D) → (B, N, p²·C); with tangents, the pair (out, tangent out)."""
        if tx is not None or tc is not None:
            return final_layer_jvp(self, x, c, tx, tc)
        shift, scale = self.adaLN_modulation(c).unbind(1)
        return self.linear(modulate(self.norm(x), shift, scale))


def check_head(net: nn.Module, head: str, tangents: object | None) -> None:
    """``head`` is ``main``, ``aux`` or ``both``; the last two need an aux head; tangents go with ``main``
    or ``both`` (the auxiliary output never carries one)."""
    if head not in ("main", "aux", "both"):
        raise ValueError(f"head must be 'main', 'aux' or 'both', got {head!r}")
    if head != "main" and not net.config.aux_head:
        raise ValueError(f"head={head!r} needs an auxiliary head: build with aux_head=true (the trainer does for "
                         f"objectives that declare needs.aux_head)")
    if head == "aux" and tangents is not None:
        raise ValueError("the auxiliary head carries no tangent: use head='both' to get (F, J·tangents, aux)")


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    """``F(x, t, s, y, guidance)`` → a tensor shaped like x (see :class:`fewstep.contracts.Backbone`).

    Args:
        config: architecture.
        in_channels: C of the (C, H, W) inputs (and outputs).
        input_size: H = W; divisible by ``config.patch_size``.
        num_classes: number of classes; the label table has ``num_classes + 1`` rows (the last one is
            the null label). 0 = unconditional: no label table, ``y`` must be ``None``.
    """

    supports_tangents = True   # forward(..., tangents=) gives the explicit JVP

    def __init__(self, config: DiTConfig, in_channels: int, input_size: int, num_classes: int):
        super().__init__()
        p, D = config.patch_size, config.hidden_size
        if in_channels < 1 or num_classes < 0:
            raise ValueError(f"DiT needs in_channels ≥ 1 and num_classes ≥ 0, got {in_channels}, {num_classes}")
        if input_size % p:
            raise ValueError(f"input resolution {input_size} is not divisible by patch_size {p}")
        check_family_build(config, "DiT", config.depth)
        self.config, self.in_channels, self.input_size, self.num_classes = config, in_channels, input_size, num_classes
        self.activation_checkpointing = False
        self.time_mode = config.time_mode
        self.grid = input_size // p                                             # tokens per side
        self.x_embedder = nn.Conv2d(in_channels, D, kernel_size=p, stride=p, bias=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, D), requires_grad=False)
        scale = config.time_scale
        self.t_embedder = TimestepEmbedder(D, scale) if config.time_mode != "h" else None   # iMF: gap only
        second = config.gap_embedder and config.time_mode != "split"                        # DMF: one embedder
        self.gap_embedder = TimestepEmbedder(D, scale) if second else None
        self.guidance_embedder = TimestepEmbedder(D, scale) if config.guidance_embedder else None
        self.cond_embedders = nn.ModuleDict({name: TimestepEmbedder(D, scale) for name in config.conditions})
        self.y_embedder = nn.Embedding(num_classes + 1, D) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config, p * p * in_channels)
        self.head_depth = aux_depth(config, config.depth)                      # 0: no aux head
        self.aux_blocks = nn.ModuleList(DiTBlock(config) for _ in range(self.head_depth))
        self.aux_final_layer = FinalLayer(config, p * p * in_channels) if config.aux_head else None
        self.split = split_index(self)
        self.initialize_weights()

    def compile_regions(self) -> list[nn.Module]:
        """Modules to ``torch.compile`` one by one (regional compilation: every block shares one
        compiled graph per mode — forward, tangent, no-grad — so compiling takes seconds, not minutes)."""
        return list(self.blocks) + list(self.aux_blocks)

    def time_embedders(self) -> list[TimestepEmbedder]:
        """Every sinusoidal-MLP embedder: time, second time, guidance and the extra conditions."""
        fixed = [e for e in (self.t_embedder, self.gap_embedder, self.guidance_embedder) if e is not None]
        return fixed + list(self.cond_embedders.values())

    def heads(self) -> list[tuple[nn.ModuleList, nn.Module]]:
        """[(blocks, final layer)] of the main head and, with ``aux_head``, the auxiliary one."""
        main = (self.blocks[self.config.depth - self.head_depth:], self.final_layer)
        return [main] + ([(self.aux_blocks, self.aux_final_layer)] if self.aux_final_layer is not None else [])

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """(Re-)initialise every parameter as ``config.init`` / ``config.time_init`` say (call again
        after materialising a model built on the ``meta`` device)."""
        cfg = self.config
        zero = [b.adaLN_modulation.linear for b in [*self.blocks, *self.aux_blocks]]
        for layer in (self.final_layer, self.aux_final_layer):
            if layer is not None:
                zero += [layer.adaLN_modulation.linear, layer.linear]
        timed = [m for e in self.time_embedders() for m in e.mlp if isinstance(m, nn.Linear)]
        base = xavier_uniform_flat_ if cfg.init == "xavier" else spectral_init_
        for m in self.modules():                      # every Linear and the patch conv
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not any(m is z for z in zero + timed):
                base(m.weight)
                nn.init.zeros_(m.bias)
        if cfg.init == "spectral-released":
            # The released TVM code divides a rebound ``.data`` alias of the patch weight by its largest
            # singular value, so the division never reaches the parameter: it keeps xavier-normal.
            nn.init.xavier_normal_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        for m in timed:
            if cfg.time_init == "spectral":
                spectral_init_(m.weight)
            else:
                nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
        pos = sincos_pos_embed_2d(cfg.hidden_size, self.grid)
        self.pos_embed.copy_(pos.to(self.pos_embed.dtype)[None])

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, *,
                tangents: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None,
                head: str = "main", **cond: Tensor) -> Tensor | tuple[Tensor, ...]:
        """x (B, C, H, W); t, s (B,) floats (s=None: one-time call); y (B,) int64 in
        [0, num_classes] (num_classes = null; None = all null); ``guidance=`` (B,) float iff the
        guidance embedder exists, and one (B,) float per name in ``config.conditions``. Returns
        (B, C, H, W), in the autocast dtype under autocast.

        ``head``: ``main`` (the output), ``aux`` (the auxiliary head's output) or ``both`` (the pair
        (main, aux)); the last two need ``aux_head``.

        With ``tangents=(tx, tt, ts)`` (shapes of x, t, s; ``None`` = zero) returns ``(F, J·tangents)``,
        the forward-mode derivative written out layer by layer (:mod:`fewstep.backbones.dit_tangents`):
        same values as ``torch.func.jvp`` of the forward, differentiable in both outputs. With
        ``head="both"`` it returns ``(F, J·tangents, aux)``: the auxiliary output without a tangent."""
        self._check_inputs(x, t, s, y, cond)
        check_head(self, head, tangents)
        if tangents is not None:
            self._check_tangents(x, t, s, tangents)
            return dit_jvp(self, x, t, s, y, cond, tangents, head)
        h = self.tokens(self.x_embedder(x)) + self.pos_embed                     # (B, N, D)
        c_early, c_late = condition_vector(self, t, s, y, cond)
        trunk = self.config.depth - self.head_depth
        for i, block in enumerate(self.blocks[:trunk]):
            h = self.run_block(block, h, c_early if i < self.split else c_late)
        outs = []
        for name, (blocks, final) in zip(("main", "aux"), self.heads()):
            if head not in (name, "both"):
                continue
            g = h
            for i, block in enumerate(blocks, start=trunk):
                g = self.run_block(block, g, c_early if i < self.split else c_late)
            outs.append(self.unpatchify(final(g, c_late)))
        return outs[0] if head != "both" else tuple(outs)

    def run_block(self, block: nn.Module, *args: Tensor | None):
        """``block(*args)``, recomputed in backward when activation checkpointing covers this block."""
        if self.activation_checkpointing and torch.is_grad_enabled() and getattr(block, "recompute", True):
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def set_activation_checkpointing(self, enabled: bool, blocks: int | None = None) -> None:
        """Recompute block activations (and tangents) in backward instead of storing them: about one
        more forward per step for a fraction of the activation memory. ``blocks``: only the first this
        many blocks (``None``: all); memory saved and recompute both scale with it."""
        if blocks is not None and blocks < 0:
            raise ValueError(f"blocks must be ≥ 0 (or None: all), got {blocks}")
        self.activation_checkpointing = bool(enabled)
        for i, block in enumerate(self.blocks):
            block.recompute = blocks is None or i < blocks

    @staticmethod
    def tokens(patches: Tensor) -> Tensor:
        """(B, D, g, g) patch embeddings → (B, N, D) tokens, contiguous. (The transposed view would
        make every residual-stream tensor (B, N, D)-shaped but (B, D, N)-strided; compiled blocks
        then got wrong input gradients on torch 2.13's Inductor, and strided kernels are slower.)"""
        return rearrange(patches, "b d gh gw -> b (gh gw) d").contiguous()

    def unpatchify(self, h: Tensor) -> Tensor:
        """(B, N, p²·C) tokens → (B, C, H, W) image."""
        g, p = self.grid, self.config.patch_size
        return rearrange(h, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=g, gw=g, p=p, q=p)

    def _check_tangents(self, x: Tensor, t: Tensor, s: Tensor | None, tangents: tuple) -> None:
        if not isinstance(tangents, (tuple, list)) or len(tangents) != 3:
            raise ValueError("tangents must be a triple (tx, tt, ts) shaped like (x, t, s); use None for zero")
        for name, p, tp in zip(("x", "t", "s"), (x, t, s), tangents):
            if tp is not None and (p is None or tp.shape != p.shape):
                raise ValueError(f"tangent of {name} must have the shape of {name} "
                                 f"{None if p is None else tuple(p.shape)}, got {tuple(tp.shape)}")

    def _check_inputs(self, x: Tensor, t: Tensor, s: Tensor | None, y: Tensor | None,
                      cond: dict[str, Tensor]) -> None:
        C, R = self.in_channels, self.input_size
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W) = (B, {C}, {R}, {R}), got shape {tuple(x.shape)}")
        if x.shape[1] != C:
            raise ValueError(f"x has {x.shape[1]} channels but this DiT expects {C}: got shape {tuple(x.shape)}")
        if tuple(x.shape[2:]) != (R, R):
            raise ValueError(f"x has resolution {x.shape[2]}×{x.shape[3]} but this DiT was built for "
                             f"{R}×{R} (patch_size {self.config.patch_size}): got shape {tuple(x.shape)}")
        check_conditioning("DiT", x.shape[0], t, s, y, cond, has_gap=self.config.gap_embedder,
                           has_guidance=self.guidance_embedder is not None, has_labels=self.y_embedder is not None,
                           num_classes=self.num_classes, conditions=self.config.conditions)

    # -- accounting -----------------------------------------------------------------------------
    def forward_flops(self, batch: int) -> float:
        """Approximate matmul FLOPs (2 × multiply-adds) of one forward on ``batch`` samples,
        including the attention products QKᵀ and PV; norms, activations and softmax are ignored."""
        cfg = self.config
        D, N, L = cfg.hidden_size, self.grid ** 2, cfg.depth
        hidden, out = int(D * cfg.mlp_ratio), cfg.patch_size ** 2 * self.in_channels
        block = 2 * N * (3 * D * D + D * D + 2 * D * hidden) + 2 * (2 * N * N * D) + 2 * D * 6 * D
        final = 2 * N * D * out + 2 * D * 2 * D
        patch = 2 * N * out * D
        embed = len(self.time_embedders()) * 2 * (FREQUENCY_DIM * D + D * D)
        aux = self.head_depth * block + final if self.aux_final_layer is not None else 0   # both heads
        return float(batch * (L * block + final + patch + embed + aux))


# ---------------------------------------------------------------------------------------------------
# Flavours (sizes); patch size is the ``patch_size`` field
# ---------------------------------------------------------------------------------------------------
def _sized(base: BackboneConfig | None, name: str, depth: int, hidden_size: int, num_heads: int) -> DiTConfig:
    """``base``'s switches (when it is a DiTConfig) at the given size; otherwise a default DiTConfig.

    A base that already has this depth and width keeps its head count (TVM's 18-head XL stays 18-head).
    """
    if isinstance(base, DiTConfig):
        if (base.depth, base.hidden_size) == (depth, hidden_size):
            num_heads = base.num_heads
        return dataclasses.replace(base, name=name, depth=depth, hidden_size=hidden_size, num_heads=num_heads)
    return DiTConfig(name=name, depth=depth, hidden_size=hidden_size, num_heads=num_heads)


@backbones.register("dit-debug", summary="DiT, depth 2, width 64, 4 heads (tests, CPU smoke runs)")
def dit_debug(base: BackboneConfig | None = None) -> DiTConfig:
    return _sized(base, "dit-debug", 2, 64, 4)


@backbones.register("dit-s", summary="DiT-S: depth 12, width 384, 6 heads (33 M with TVM's embedders)")
def dit_s(base: BackboneConfig | None = None) -> DiTConfig:
    return _sized(base, "dit-s", 12, 384, 6)


@backbones.register("dit-b", summary="DiT-B: depth 12, width 768, 12 heads (130 M)")
def dit_b(base: BackboneConfig | None = None) -> DiTConfig:
    return _sized(base, "dit-b", 12, 768, 12)


@backbones.register("dit-l", summary="DiT-L: depth 24, width 1024, 16 heads (460 M)")
def dit_l(base: BackboneConfig | None = None) -> DiTConfig:
    return _sized(base, "dit-l", 24, 1024, 16)


@backbones.register("dit-xl", summary="DiT-XL: depth 28, width 1152, 16 heads (675 M; TVM: 18 heads)")
def dit_xl(base: BackboneConfig | None = None) -> DiTConfig:
    return _sized(base, "dit-xl", 28, 1152, 16)
