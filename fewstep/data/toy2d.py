"""``toy2d``: eight Gaussians on a circle, the 2-D toy every objective trains on in a CPU minute.

Component k (k = 0 … 7) is N(μ_k, σ²I) with μ_k = R·(cos 2πk/8, sin 2πk/8), R = 2, σ = 0.15 (the
"8 Gaussians" of the flow-matching literature), each drawn with probability 1/8. The class of
component k is ``k mod 4``: class c owns the two *opposite* components c and c + 4, so every class is
bimodal with its mean at the origin, as an image class is multimodal. A sampler that averages modes
(one-step flow matching returns E[x | y] = 0) is then visibly and measurably wrong, while classifier-free
guidance still has a class to steer to. (With one class per component, each class would be a single
tight Gaussian and a one-step sampler would be nearly exact; set ``NUM_CLASSES = 8`` for that variant.)

The points are multiplied by ``SCALE = 1/√(R²/2 + σ²)``; the mixture's covariance is (R²/2 + σ²)·I,
so the data has zero mean and identity covariance, like normalised pixels or latents, and the noise
scale t·ε means the same thing as for images.

Points are stored as (C=2, H=1, W=1) float32 items so every image-shaped code path (backbones, the
sampler, the trainer) works unchanged; the spec has ``kind="points"``. The splits are fixed: ``train``
(50 000 points, seed 0) and ``test`` (10 000 held-out points, seed 1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec
from fewstep.data.base import DataError
from fewstep.registry import datasets

NUM_COMPONENTS = 8
NUM_CLASSES = 4                                       # class of component k: k mod NUM_CLASSES
RADIUS = 2.0
STD = 0.15
SCALE = 1.0 / math.sqrt(RADIUS ** 2 / 2 + STD ** 2)   # per-coordinate std of the raw mixture → 1
SPLITS = {"train": (50_000, 0), "test": (10_000, 1)}  # split → (number of points, seed)


def component_means(dtype: torch.dtype = torch.float32) -> Tensor:
    """(K, 2) means of the K = 8 components after scaling: SCALE·R·(cos 2πk/K, sin 2πk/K)."""
    angle = 2 * math.pi * torch.arange(NUM_COMPONENTS, dtype=torch.float64) / NUM_COMPONENTS
    return (SCALE * RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)).to(dtype)


def class_of_component(k: Tensor) -> Tensor:
    """Class label of components ``k`` (int64): ``k mod NUM_CLASSES``."""
    return k % NUM_CLASSES


def component_std() -> float:
    """Per-coordinate std of each component after scaling: SCALE·σ ≈ 0.105."""
    return SCALE * STD


def sample_mixture(num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` points of the scaled mixture from a generator seeded with ``seed``.

    Returns:
        (points (num, 2) float32, labels (num,) int64 class in [0, NUM_CLASSES)); a pure function of
        (num, seed).
    """
    gen = torch.Generator().manual_seed(seed)
    component = torch.randint(NUM_COMPONENTS, (num,), generator=gen)
    noise = torch.randn((num, 2), generator=gen, dtype=torch.float64)
    points = component_means(torch.float64)[component] + component_std() * noise
    return points.to(torch.float32), class_of_component(component)


class Toy2D(Dataset):
    """The 8-Gaussian mixture in memory: items ``(x, y)``, x (2, 1, 1) float32 (unit std per
    coordinate, |x| ≲ 1.7), y a 0-d int64 class in [0, 4) (the pair of opposite components y, y + 4).

    Args:
        split: ``train`` (50 000 points, seed 0) or ``test`` (10 000 points, seed 1).
        name: dataset name recorded in the spec.

    Attributes:
        points: (N, 2, 1, 1) float32; labels: (N,) int64; spec: ``kind="points"``, channels 2,
        resolution 1, 4 classes; means: (8, 2) float32 component means (component k has class
        k mod 4); std: component std.
    """

    def __init__(self, split: str = "train", name: str = "toy2d"):
        if split not in SPLITS:
            raise DataError(f"toy2d has splits {', '.join(map(repr, SPLITS))}, not {split!r}")
        num, seed = SPLITS[split]
        points, labels = sample_mixture(num, seed)
        self.split = split
        self.points = points.reshape(num, 2, 1, 1).contiguous()
        self.labels = labels
        self.means, self.std = component_means(), component_std()
        self.class_names = [" & ".join(f"{360 * k // NUM_COMPONENTS}°" for k in range(c, NUM_COMPONENTS, NUM_CLASSES))
                            for c in range(NUM_CLASSES)]
        self.spec = DataSpec(name=name, channels=2, resolution=1, num_classes=NUM_CLASSES,
                             num_items=num, kind="points")

    def __len__(self) -> int:
        return self.points.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(x, y)``: x (2, 1, 1) float32, y a 0-d int64 class."""
        return self.points[index], self.labels[index]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Items ``indices`` (B,) int64 at once: x (B, 2, 1, 1) float32, y (B,) int64."""
        return self.points[indices], self.labels[indices]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


@datasets.register("toy2d", summary="2-D toy: 8 Gaussians on a circle, unit std, 4 bimodal classes "
                                    "(50k train / 10k test points, generated; CPU minutes)")
def toy2d(cfg: DataConfig) -> Toy2D:
    """The toy mixture's ``cfg.split``; ``cfg.root`` is unused and ``cfg.resolution`` must be None or 1."""
    if cfg.resolution not in (None, 1):
        raise DataError(f"toy2d points are (2, 1, 1) items; data.resolution must be unset or 1, "
                        f"got {cfg.resolution}")
    return Toy2D(split=cfg.split, name=cfg.name)
