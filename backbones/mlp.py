"""A residual MLP backbone for low-dimensional (``points``) data, meeting the same contract as the DiT.

``F(x, t, s, y, guidance, **conditions)``: the item (B, C, H, W) is flattened to (B, C·H·W) and
projected to the width; the conditioning vector c is the sum of sinusoidal-MLP embeddings of the times
(as ``time_mode`` says: t and the gap t − s by default), of a per-sample guidance scalar
(``guidance_embedder``), of each extra scalar condition (``conditions``) and of the label (a table with a
null row at index ``num_classes``). Each residual block is
``h ← h + fc2(SiLU(fc1(LN(h)·(1 + scale) + shift)))`` with (shift, scale) = Linear(SiLU(c)) — DiT's
adaLN without the gate — and the output layer (LN → Linear) starts at zero, so an untrained net
predicts 0. The conditioning switches are the DiT's (``time_mode``, ``split_depth``, ``conditions``,
``aux_head``; docs/design/frontier.md §1). Pure and JVP-safe: no in-place ops, no data-dependent control
flow under forward AD.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewstep.backbones.dit import ConditioningConfig, aux_depth, check_family_build, check_head, family_checks
from fewstep.backbones.inputs import check_conditioning, condition_vector, split_index
from fewstep.backbones.layers import EPS, FREQUENCY_DIM, TimestepEmbedder
from fewstep.config import BackboneConfig, require
from fewstep.contracts import DataSpec
from fewstep.registry import backbones


@dataclass(kw_only=True)
class MLPConfig(ConditioningConfig):
    """Residual-MLP architecture.

    Attributes:
        width: hidden width W of every layer and of the conditioning vector.
        depth: number of residual blocks (each two W×W layers plus a W → 2W modulation).
        gap_embedder … aux_head_depth: the conditioning switches
            (:class:`fewstep.backbones.dit.ConditioningConfig`); blocks are the residual blocks, the
            output layer is the final layer.
    """

    name: str = "mlp"
    width: int = 256
    depth: int = 3

    def __post_init__(self) -> None:
        require([(self.width >= 1, f"width must be ≥ 1, got {self.width}"),
                 (self.depth >= 1, f"depth must be ≥ 1, got {self.depth}"),
                 (self.time_scale > 0, f"time_scale must be > 0, got {self.time_scale}"),
                 *family_checks(self)], "MLPConfig")

    def build(self, data: DataSpec) -> "MLP":
        """A freshly initialised MLP for items of ``data`` (channels, resolution, classes)."""
        return MLP(self, in_channels=data.channels, input_size=data.resolution, num_classes=data.num_classes)


class ResBlock(nn.Module):
    """``h + fc2(SiLU(fc1(LN(h)·(1 + scale) + shift)))``, (shift, scale) = Linear(SiLU(c)); h, c (B, W)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=EPS)
        self.modulation = nn.Linear(width, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(nn.functional.silu(c)).chunk(2, dim=-1)
        u = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(self.fc1(u)))


class MLP(nn.Module):
    """``F(x, t, s, y, guidance)`` → a tensor shaped like x (see :class:`fewstep.contracts.Backbone`).

    Args:
        config: architecture.
        in_channels: C of the (C, H, W) items (2 for ``toy2d``).
        input_size: H = W (1 for points); the net sees C·H·W features.
        num_classes: number of classes; the label table has ``num_classes + 1`` rows (the last is
            null). 0 = unconditional: no label table, ``y`` must be ``None``.
    """

    def __init__(self, config: MLPConfig, in_channels: int, input_size: int, num_classes: int):
        super().__init__()
        if in_channels < 1 or input_size < 1 or num_classes < 0:
            raise ValueError(f"MLP needs in_channels ≥ 1, input_size ≥ 1 and num_classes ≥ 0, got "
                             f"{in_channels}, {input_size}, {num_classes}")
        check_family_build(config, "MLP", config.depth)
        W, scale = config.width, config.time_scale
        self.config, self.in_channels, self.input_size, self.num_classes = config, in_channels, input_size, num_classes
        self.time_mode = config.time_mode
        self.features = in_channels * input_size * input_size
        self.in_proj = nn.Linear(self.features, W)
        self.t_embedder = TimestepEmbedder(W, scale) if config.time_mode != "h" else None
        second = config.gap_embedder and config.time_mode != "split"
        self.gap_embedder = TimestepEmbedder(W, scale) if second else None
        self.guidance_embedder = TimestepEmbedder(W, scale) if config.guidance_embedder else None
        self.cond_embedders = nn.ModuleDict({name: TimestepEmbedder(W, scale) for name in config.conditions})
        self.y_embedder = nn.Embedding(num_classes + 1, W) if num_classes > 0 else None
        self.blocks = nn.ModuleList(ResBlock(W) for _ in range(config.depth))
        self.out_norm = nn.LayerNorm(W, elementwise_affine=False, eps=EPS)
        self.out_proj = nn.Linear(W, self.features)
        self.head_depth = aux_depth(config, config.depth)
        self.aux_blocks = nn.ModuleList(ResBlock(W) for _ in range(self.head_depth))
        self.aux_out_proj = nn.Linear(W, self.features) if config.aux_head else None
        self.split = split_index(self)
        self.initialize_weights()

    def time_embedders(self) -> list[TimestepEmbedder]:
        """Every sinusoidal-MLP embedder: time, second time, guidance and the extra conditions."""
        fixed = [e for e in (self.t_embedder, self.gap_embedder, self.guidance_embedder) if e is not None]
        return fixed + list(self.cond_embedders.values())

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """PyTorch's default Linear init, N(0, 0.02) time MLPs and label table (as the DiT), and a
        zero output layer. Call again after materialising a model built on the ``meta`` device."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        for e in self.time_embedders():
            for m in e.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for proj in (self.out_proj, self.aux_out_proj):
            if proj is not None:
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, *,
                head: str = "main", **cond: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, W); t, s (B,) floats (s=None: one-time call); y (B,) int64 in
        [0, num_classes] (num_classes = null; None = all null); ``guidance=`` (B,) float iff the
        guidance embedder exists, one (B,) float per name in ``config.conditions``. ``head``: ``main``,
        ``aux`` or ``both`` (the pair; needs ``aux_head``). Returns (B, C, H, W) in x's dtype."""
        self._check_inputs(x, t, s, y, cond)
        check_head(self, head, None)
        c_early, c_late = condition_vector(self, t, s, y, cond)
        h = self.in_proj(x.reshape(x.shape[0], self.features))
        trunk = self.config.depth - self.head_depth
        for i, block in enumerate(self.blocks[:trunk]):
            h = block(h, c_early if i < self.split else c_late)
        outs = []
        heads = [("main", self.blocks[trunk:], self.out_proj), ("aux", self.aux_blocks, self.aux_out_proj)]
        for name, blocks, proj in heads:
            if head not in (name, "both"):
                continue
            g = h
            for i, block in enumerate(blocks, start=trunk):
                g = block(g, c_early if i < self.split else c_late)
            outs.append(proj(self.out_norm(g)).reshape(x.shape))
        return outs[0] if head != "both" else tuple(outs)

    def _check_inputs(self, x: Tensor, t: Tensor, s: Tensor | None, y: Tensor | None,
                      cond: dict[str, Tensor]) -> None:
        C, R = self.in_channels, self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (C, R, R):
            raise ValueError(f"x must be (B, C, H, W) = (B, {C}, {R}, {R}) for this MLP, got shape {tuple(x.shape)}")
        check_conditioning("MLP", x.shape[0], t, s, y, cond, has_gap=self.config.gap_embedder,
                           has_guidance=self.guidance_embedder is not None, has_labels=self.y_embedder is not None,
                           num_classes=self.num_classes, conditions=self.config.conditions)

    def forward_flops(self, batch: int) -> float:
        """Matmul FLOPs (2 × multiply-adds) of one forward on ``batch`` samples; norms, activations and
        the label lookup are ignored."""
        W, L, F = self.config.width, self.config.depth, self.features
        embed = len(self.time_embedders()) * (FREQUENCY_DIM * W + W * W)
        aux = self.head_depth * 4 * W * W + W * F if self.aux_out_proj is not None else 0   # both heads
        return float(2 * batch * (F * W + L * 4 * W * W + embed + W * F + aux))


@backbones.register("mlp", summary="residual MLP, width 256, depth 3, adaLN conditioning (toy2d points)")
def mlp(base: BackboneConfig | None = None) -> MLPConfig:
    """Width 256, depth 3; the switches (gap/guidance embedders, time_scale) of an MLPConfig ``base`` are kept."""
    if isinstance(base, MLPConfig):
        return dataclasses.replace(base, name="mlp", width=256, depth=3)
    return MLPConfig(name="mlp", width=256, depth=3)
