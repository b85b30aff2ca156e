"""FD-DINOv2 extractor with a small random ViT in DINOv2's state_dict layout: the architecture read from the
weights, features against PyTorch's own transformer layers, EDM2's preprocessing, the position-embedding
resize and the errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewstep.metrics import make_extractor
from fewstep.metrics.dinov2 import DinoV2WeightsError, build_from_state


def random_dinov2_state(dim=64, depth=2, hidden=128, patch=14, grid=16, registers=0, seed=0) -> dict:
    """A random state_dict with DINOv2's key names and shapes (facebookresearch/dinov2 vision_transformer)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, dim, scale=0.5), "pos_embed": r(1, 1 + grid * grid, dim, scale=0.5),
             "mask_token": torch.zeros(1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch),
             "patch_embed.proj.bias": r(dim), "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        state["register_tokens"] = r(1, registers, dim, scale=0.5)
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim, scale=0.2),
                      b + "attn.qkv.bias": r(3 * dim), b + "attn.proj.weight": r(dim, dim, scale=0.2),
                      b + "attn.proj.bias": r(dim), b + "ls1.gamma": 0.5 + r(dim), b + "norm2.weight": 1 + r(dim),
                      b + "norm2.bias": r(dim), b + "mlp.fc1.weight": r(hidden, dim, scale=0.2),
                      b + "mlp.fc1.bias": r(hidden), b + "mlp.fc2.weight": r(dim, hidden, scale=0.2),
                      b + "mlp.fc2.bias": r(dim), b + "ls2.gamma": 0.5 + r(dim)})
    return state


def reference_features(state: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The same network through torch.nn.TransformerEncoderLayer (pre-norm, exact GELU), LayerScale folded
    into the output projections: γ·(W a + b) = (γW) a + γb."""
    dim = state["cls_token"].shape[-1]
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], 1) + state["pos_embed"]
    if "register_tokens" in state:
        t = torch.cat([t[:, :1], state["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b = lambda k: state[f"blocks.{i}.{k}"]   # noqa: E731
        layer = nn.TransformerEncoderLayer(dim, heads, b("mlp.fc1.weight").shape[0], dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(b("attn.qkv.weight"))
            layer.self_attn.in_proj_bias.copy_(b("attn.qkv.bias"))
            layer.self_attn.out_proj.weight.copy_(b("ls1.gamma")[:, None] * b("attn.proj.weight"))
            layer.self_attn.out_proj.bias.copy_(b("ls1.gamma") * b("attn.proj.bias"))
            layer.linear1.weight.copy_(b("mlp.fc1.weight"))
            layer.linear1.bias.copy_(b("mlp.fc1.bias"))
            layer.linear2.weight.copy_(b("ls2.gamma")[:, None] * b("mlp.fc2.weight"))
            layer.linear2.bias.copy_(b("ls2.gamma") * b("mlp.fc2.bias"))
            layer.norm1.weight.copy_(b("norm1.weight")), layer.norm1.bias.copy_(b("norm1.bias"))
            layer.norm2.weight.copy_(b("norm2.weight")), layer.norm2.bias.copy_(b("norm2.bias"))
        t = layer.eval()(t)
        i += 1
    return F.layer_norm(t, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


@pytest.mark.parametrize("registers", [0, 4])
def test_features_match_pytorch_transformer_layers_and_edm2_preprocessing(tmp_path, registers):
    state = random_dinov2_state(registers=registers)
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    ex = make_extractor("dinov2", path=path, heads=1)
    assert ex.feature_dim == 64 and len(ex.net.blocks) == 2 and ex.net.patch == 14 and ex.net.grid == 16
    images = torch.randint(0, 256, (3, 1, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = F.interpolate(images.expand(-1, 3, -1, -1).float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(ex.preprocess(images), x, atol=1e-6)                         # EDM2's DINOv2Detector
    with torch.no_grad():
        expected = reference_features(state, x, heads=1)
    assert torch.allclose(ex(images), expected, atol=1e-4)
    meta = ex.metadata()
    assert meta["extractor"] == "dinov2" and meta["feature_dim"] == 64 and len(meta["weights_sha256"]) == 64


def test_position_embedding_is_resized_as_dinov2_does():
    """Trained at 37×37 (518 px), used at 16×16 (224 px): bicubic with scale factor 16.1/37, no antialias."""
    state = random_dinov2_state(grid=37)
    net = build_from_state(state, heads=1)
    pos = net.position_embedding(16, 16)
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 64).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    assert pos.shape == (1, 257, 64) and torch.equal(pos[:, 0], state["pos_embed"][:, 0])
    assert torch.allclose(pos[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 256, 64))


def test_missing_or_foreign_weights_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("FEWSTEP_DINOV2", raising=False)
    with pytest.raises(DinoV2WeightsError, match="never downloads.*--dinov2 PATH"):
        make_extractor("dinov2")
    with pytest.raises(DinoV2WeightsError, match="not found"):
        make_extractor("dinov2", path=tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(DinoV2WeightsError, match="not DINOv2 weights: no 'cls_token'"):
        make_extractor("dinov2", path=tmp_path / "other.pth")
