"""Feature extractors for Fréchet distances: uint8 images in, (N, D) features out.

Registered in :data:`fewstep.registry.extractors` (``fewstep list extractors``):

* ``inception``: the standard FID network (TF ``inception-2015-12-05`` as TorchScript, located and
  SHA-256-checked by :mod:`fewstep.metrics.inception`): grey → RGB, resize to 299×299, then
  ``(x − 128)/128``; 2048-d pool features. The resize is clean-fid's ``clean`` (PIL's bicubic filter on
  float pixels in [0, 255], per channel, clipped) or ``tf1-bilinear`` (TensorFlow 1's ``resize_bilinear``
  as ADM's evaluator and NVIDIA's Inception translation do it); see :mod:`fewstep.metrics.protocols`.
* ``random-projection``: a fixed Gaussian projection of the pixels (tests and CPU pipelines).

A plugin registers a callable ``(device=..., **options) -> FeatureExtractor`` under a new name (entry-point
group ``fewstep.extractors``), as the in-tree ``dinov2`` (:mod:`fewstep.metrics.dinov2`) is registered. Its
:meth:`FeatureExtractor.metadata` identifies it in reference statistics, so FIDs from different extractors
are never compared. Extractors with class probabilities (``has_probabilities``) also give the Inception Score.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings

import torch
from torch import Tensor, nn

from fewstep.registry import extractors


class FeatureExtractor(nn.Module):
    """uint8 (N, C, H, W) images, C ∈ {1, 3} → (N, D) float features.

    Subclasses set ``name``, ``feature_dim`` and implement :meth:`preprocess` (uint8 → the float input of
    the network, on the extractor's device) and :meth:`embed` (that input → features).
    """

    name: str = "?"
    feature_dim: int = 0
    #: Whether :meth:`embed_with_probabilities` gives class probabilities (for the Inception Score).
    has_probabilities: bool = False

    def preprocess(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def embed_with_probabilities(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features (N, D) and class probabilities (N, K) from one pass, or ``None`` for the second where the
        network has no classifier output (the default)."""
        return self.embed(x), None

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"extractor {self.name!r} needs (N, 1|3, H, W) uint8 images, "
                             f"got {tuple(images.shape)} {images.dtype}")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        self._check(images)
        return self.embed(self.preprocess(images))

    @property
    def metric_name(self) -> str:
        """What a Fréchet distance in these features is called: ``FID`` only for the FID Inception network,
        ``FD (<extractor>)`` for every other extractor."""
        return "FID" if self.name == "inception" else f"FD ({self.name})"

    @torch.no_grad()
    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 images → (features, class probabilities or ``None``)."""
        self._check(images)
        return self.embed_with_probabilities(self.preprocess(images))

    def metadata(self) -> dict:
        """Identity recorded next to statistics: ``extractor``, ``weights_sha256``, ``resize``, ``input_size``."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------
# clean-fid's "clean" resize (PIL bicubic on float images), as two matrix products
# ---------------------------------------------------------------------------------------------------
def _bicubic(x: float, a: float = -0.5) -> float:
    """PIL's bicubic kernel (Keys, a = −0.5), support 2."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def pil_bicubic_weights(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) float64 resampling matrix of PIL's ``resize(..., BICUBIC)`` along one axis.

    Mirrors Pillow's ``precompute_coeffs``: output pixel i is centred at (i + ½)·s in input pixels,
    s = in/out; when shrinking the kernel is stretched by s (antialiasing); taps are cut at the image
    border and each row is renormalised to sum to 1.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) / filterscale) for x in range(lo, hi)]
        total = sum(taps)
        w[i, lo:hi] = torch.tensor(taps, dtype=torch.float64) / (total if total != 0.0 else 1.0)
    return w


class CleanResize(nn.Module):
    """float (N, C, H, W) in [0, 255] → float32 (N, C, size, size) in [0, 255], equal to clean-fid's
    ``build_resizer("clean")`` (PIL bicubic, mode ``F``, clipped) up to float32 round-off: the horizontal
    pass first, rounded to float32 as PIL stores it, then the vertical pass, both accumulated in float64."""

    weights = staticmethod(pil_bicubic_weights)   # (out_size, in_size) float64 matrix of one axis

    def __init__(self, size: int = 299):
        super().__init__()
        self.size = size
        self._weights: dict[tuple[int, str], Tensor] = {}

    def _w(self, n: int, device: torch.device) -> Tensor:
        key = (n, str(device))
        if key not in self._weights:
            self._weights[key] = self.weights(n, self.size).to(device)
        return self._weights[key]

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = x.to(torch.float32)
        if w != self.size:
            x = (x.double() @ self._w(w, x.device).T).float()
        if h != self.size:
            x = (self._w(h, x.device) @ x.double()).float()
        return x.clamp(0, 255)


def tf1_bilinear_weights(in_size: int, out_size: int) -> Tensor:
    """(out_size, in_size) float64 matrix of TF1's ``tf.image.resize_bilinear`` (``align_corners=False``,
    ``half_pixel_centers=False``) along one axis: output pixel j samples input coordinate j·in/out (no
    half-pixel offset), linearly between ⌊·⌋ and ⌊·⌋ + 1, the upper index clamped to the last pixel; no
    antialiasing when shrinking. This is the resize inside ADM's TF Inception graph, which NVIDIA's
    Inception translation emulates with ``grid_sample`` (border padding)."""
    scale = in_size / out_size
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for j in range(out_size):
        src = j * scale
        lo = min(int(src), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        w[j, lo] += 1 - frac
        w[j, hi] += frac
    return w


class TF1BilinearResize(CleanResize):
    """float (N, C, H, W) in [0, 255] → float32 (N, C, size, size): TF1 ``resize_bilinear`` (no half-pixel
    centres) as two matrix products accumulated in float64 (:func:`tf1_bilinear_weights`). Bilinear
    weights are convex, so the output stays in [0, 255] without clipping."""

    weights = staticmethod(tf1_bilinear_weights)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = x.to(torch.float64)
        if w != self.size:
            x = x @ self._w(w, x.device).T
        if h != self.size:
            x = self._w(h, x.device) @ x
        return x.float()


def cleanfid_resize(x: Tensor, size: int = 299) -> Tensor:
    """The same resize through ``cleanfid.resize`` itself, one image at a time on the CPU (the reference
    path; needs ``clean-fid``, whose ``resize`` module imports without torchvision)."""
    from cleanfid.resize import make_resizer

    fn = make_resizer("PIL", False, "bicubic", (size, size))
    out = [torch.from_numpy(fn(img.permute(1, 2, 0).float().cpu().numpy())).permute(2, 0, 1) for img in x]
    return torch.stack(out).to(x.device)


# ---------------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------------
@extractors.register("inception", summary="FID Inception-v3 (TF inception-2015-12-05 TorchScript), "
                     "clean-fid 'clean' resize to 299, 2048-d pool features")
class InceptionExtractor(FeatureExtractor):
    """The standard FID Inception network.

    Args:
        path: weights file (default: searched as :func:`fewstep.metrics.inception.locate_inception` says).
        device: where to run.
        resize: ``clean`` (PIL-equivalent bicubic as matrix products on ``device``) or ``cleanfid``
            (``cleanfid.resize`` per image on the CPU; slow, the literal reference).
    """

    name = "inception"
    feature_dim = 2048
    input_size = 299

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 resize: str = "clean"):
        super().__init__()
        from fewstep.metrics.inception import locate_inception

        if resize not in ("clean", "cleanfid", "tf1-bilinear"):
            raise ValueError(f"resize must be 'clean', 'cleanfid' or 'tf1-bilinear', got {resize!r}")
        self.path, self.sha256 = locate_inception(path)
        with warnings.catch_warnings():   # torch.jit.load is deprecated in torch ≥ 2.13; still the format shipped
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        self.device = torch.device(device)
        self.resize_impl = resize
        self.resizer = TF1BilinearResize(self.input_size) if resize == "tf1-bilinear" else CleanResize(self.input_size)

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize_impl == "cleanfid":
            return cleanfid_resize(x, self.input_size)
        return self.resizer(x)

    def embed(self, x: Tensor) -> Tensor:
        """x: (N, 3, 299, 299) float in [0, 255] → (N, 2048) float32 pool features."""
        return self.net((x.to(self.device, torch.float32) - 128) / 128)

    def metadata(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.sha256,
                "resize": "tf1-bilinear" if self.resize_impl == "tf1-bilinear" else "clean",
                "input_size": self.input_size, "feature_dim": self.feature_dim}


@extractors.register("random-projection", summary="fixed Gaussian projection of pixels (tests, CPU smoke runs)")
class RandomProjection(FeatureExtractor):
    """Features f = P (u8/127.5 − 1) (float64) with P (dim, C·H·W) ~ N(0, 1/(C·H·W)) drawn from ``seed``.

    Linear, so Gaussian pixels give Gaussian features with closed-form statistics (used by tests).

    Args:
        dim: feature dimension D.
        seed: seed of P; P depends only on (seed, dim, C·H·W).
        device: where to run.
    """

    name = "random-projection"

    def __init__(self, dim: int = 64, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        self.feature_dim, self.seed, self.device = dim, seed, torch.device(device)
        self._p: dict[int, Tensor] = {}

    def projection(self, numel: int) -> Tensor:
        """P (dim, numel) float64 for images of ``numel`` values each."""
        if numel not in self._p:
            gen = torch.Generator().manual_seed(self.seed)
            p = torch.randn(self.feature_dim, numel, generator=gen, dtype=torch.float64) / math.sqrt(numel)
            self._p[numel] = p.to(self.device)
        return self._p[numel]

    def preprocess(self, images: Tensor) -> Tensor:
        return images.to(self.device, torch.float64)

    def embed(self, x: Tensor) -> Tensor:
        """Float64 throughout, so features do not depend on the batch they were computed in."""
        flat = x.flatten(1).double() / 127.5 - 1
        return flat @ self.projection(flat.shape[1]).T

    def metadata(self) -> dict:
        tag = f"random-projection seed={self.seed} dim={self.feature_dim}".encode()
        return {"extractor": self.name, "weights_sha256": hashlib.sha256(tag).hexdigest(), "resize": "none",
                "input_size": None, "feature_dim": self.feature_dim}


def make_extractor(name: str = "inception", device: torch.device | str = "cpu", **options) -> FeatureExtractor:
    """Build the registered extractor ``name`` on ``device``; ``options`` go to its constructor
    (``path``/``resize`` for ``inception``, ``dim``/``seed`` for ``random-projection``)."""
    return extractors.get(name)(device=device, **options)
