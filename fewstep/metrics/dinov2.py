"""FD-DINOv2: Fréchet distance in the features of DINOv2 ViT-L/14 (Stein et al. 2023), as EDM2 reports it.

``dinov2`` (:data:`fewstep.registry.extractors`) embeds images with a DINOv2 vision transformer whose
weights the user provides (fewstep never downloads them): the ``state_dict`` of
``facebookresearch/dinov2``'s ``dinov2_vitl14`` (``dinov2_vitl14_pretrain.pth``), as a ``.pth`` or
``.safetensors`` file, via ``path=``, ``--dinov2 PATH`` or ``$FEWSTEP_DINOV2``. The architecture is read
from the weights (width, depth, patch size, MLP width, register tokens, LayerScale); heads have 64
dimensions as in every DINOv2 model.

Preprocessing (EDM2 ``calculate_metrics.py`` ``DINOv2Detector``, resize mode ``torch``): uint8 RGB (grey
repeated) → float, bicubic resize with antialiasing to 224×224, /255, ImageNet normalisation (mean
0.485/0.456/0.406, std 0.229/0.224/0.225). Features: the final-norm class token (1024-d for ViT-L), the
output of DINOv2's ``forward`` with its identity head. Position embeddings trained at another grid (518 px:
37×37) are resized as DINOv2 does: bicubic, no antialiasing, scale factor (grid + 0.1)/37.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.files import sha256_of
from fewstep.metrics.extractors import FeatureExtractor
from fewstep.registry import extractors

ENV_VAR = "FEWSTEP_DINOV2"
INPUT_SIZE = 224
HEAD_DIM = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATE_OFFSET = 0.1


class DinoV2WeightsError(FileNotFoundError):
    """Missing or unusable DINOv2 weights."""


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + γ₁·Attn(LN(x)), then x + γ₂·MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, layerscale: bool):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layerscale else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if layerscale else None

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        a = self.proj(a)
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + (m * self.ls2 if self.ls2 is not None else m)


class DinoViT(nn.Module):
    """DINOv2's vision transformer (inference only), built to match a ``state_dict``'s shapes.

    Args:
        dim, depth, heads, hidden: width, blocks, attention heads, MLP width.
        patch: patch size; grid: side of the trained position-embedding grid; registers: register tokens.
        layerscale: blocks carry LayerScale vectors.
    """

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, patch: int, grid: int, registers: int,
                 layerscale: bool):
        super().__init__()
        self.patch, self.grid = patch, grid
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, layerscale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, h: int, w: int) -> Tensor:
        """(1, 1 + h·w, D) for an h×w patch grid: the stored one, or its bicubic resize (DINOv2's
        ``interpolate_pos_encoding``: scale factor (side + 0.1)/grid, no antialiasing)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = patches.shape[-1]
        patches = patches.float().reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)
        scale = ((w + INTERPOLATE_OFFSET) / self.grid, (h + INTERPOLATE_OFFSET) / self.grid)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        if patches.shape[-2:] != (w, h):
            raise ValueError(f"position embedding resized to {tuple(patches.shape[-2:])}, expected {(w, h)}")
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, D).to(cls.dtype)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images → (N, D) final-norm class tokens."""
        B, _, H, W = x.shape
        t = self.patch_embed(x).flatten(2).transpose(1, 2)                           # (B, h·w, D)
        t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1)
        t = t + self.position_embedding(H // self.patch, W // self.patch)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(B, -1, -1), t[:, 1:]], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)[:, 0]


# DINOv2 state_dict names → ours (the blocks' MLP and LayerScale live one level down there).
_RENAMES = [(r"^patch_embed\.proj\.", "patch_embed."), (r"\.mlp\.fc1\.", ".fc1."), (r"\.mlp\.fc2\.", ".fc2."),
            (r"\.attn\.qkv\.", ".qkv."), (r"\.attn\.proj\.", ".proj."), (r"\.ls1\.gamma$", ".ls1"),
            (r"\.ls2\.gamma$", ".ls2")]


def load_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DinoV2WeightsError(f"{path} holds no state_dict (a dict of tensors)")
    return state


def build_from_state(state: dict[str, Tensor], heads: int | None = None) -> DinoViT:
    """A :class:`DinoViT` shaped like ``state`` (DINOv2 key names) with its weights loaded."""
    if any(".mlp.w12." in k for k in state):
        raise DinoV2WeightsError("SwiGLU DINOv2 weights (ViT-g) are not supported; use dinov2_vitl14 (EDM2's FD-DINOv2)")
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight"):
        if key not in state:
            raise DinoV2WeightsError(f"not DINOv2 weights: no {key!r} (keys start {sorted(state)[:5]})")
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    net = DinoViT(dim, depth, heads or max(1, dim // HEAD_DIM), state["blocks.0.mlp.fc1.weight"].shape[0],
                  state["patch_embed.proj.weight"].shape[-1], grid, registers, "blocks.0.ls1.gamma" in state)
    ours = {}
    for k, v in state.items():
        if k == "mask_token":
            continue
        for pattern, repl in _RENAMES:
            k = re.sub(pattern, repl, k)
        ours[k] = v
    missing, unexpected = net.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise DinoV2WeightsError(f"DINOv2 weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return net.eval()


@extractors.register("dinov2", summary="DINOv2 ViT (user-provided weights, e.g. dinov2_vitl14): FD-DINOv2 as EDM2, "
                     "bicubic resize to 224, class-token features")
class DinoV2Extractor(FeatureExtractor):
    """Class-token features of a DINOv2 ViT with user-provided weights.

    Args:
        path: weights (``.pth`` state dict or ``.safetensors``); default ``$FEWSTEP_DINOV2``.
        device: where to run.
        heads: attention heads (default: width / 64, as every DINOv2 model).
    """

    name = "dinov2"

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 heads: int | None = None):
        super().__init__()
        given = path or os.environ.get(ENV_VAR)
        if not given:
            raise DinoV2WeightsError(
                "FD-DINOv2 needs DINOv2 weights, which fewstep never downloads: get dinov2_vitl14_pretrain.pth "
                f"(facebookresearch/dinov2, the model EDM2 uses) and pass --dinov2 PATH or set {ENV_VAR}")
        self.path = Path(given).expanduser()
        if not self.path.is_file():
            raise DinoV2WeightsError(f"DINOv2 weights not found at {self.path}")
        self.device = torch.device(device)
        self.net = build_from_state(load_state(self.path), heads).to(self.device)
        self.sha256 = sha256_of(self.path)
        self.feature_dim = self.net.norm.weight.shape[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(self.device), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(self.device), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 1|3, H, W) → (N, 3, 224, 224) float32, EDM2's resize and normalisation."""
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x.to(torch.float32), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        return (x / 255 - self.mean) / self.std

    def embed(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.net(x.float())

    def metadata(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.sha256, "resize": "bicubic-antialias",
                "input_size": INPUT_SIZE, "feature_dim": self.feature_dim}


__all__ = ["DinoV2Extractor", "DinoV2WeightsError", "DinoViT", "build_from_state"]
