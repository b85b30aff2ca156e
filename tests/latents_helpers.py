"""Helpers for the latent-data tests: a tiny random ``AutoencoderKL`` (factor 8, 4 latent channels, like the
SD VAEs) built from a config, a generated image folder, and prepared directories written from arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=32)


def tiny_vae(seed: int = 0):
    """A random-weight AutoencoderKL with the SD VAE's layout (factor 8, 4 channels), 25k parameters."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed (pip install 'fewstep[latent]')")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(**TINY_VAE).eval()


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    tiny_vae(seed).save_pretrained(str(path))
    return path


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, lo: int = 32, hi: int = 60) -> Path:
    """RGB PNGs of random sizes in [lo, hi) per side, one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = (int(v) for v in rng.integers(lo, hi, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def random_posterior(n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean (N, C, h, w) ~ N(channel offset, 1) and std in [0.1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(shape[0], dtype=torch.float32).view(1, -1, 1, 1)
    return torch.randn((n, *shape), generator=g) + offsets, torch.rand((n, *shape), generator=g) + 0.1
