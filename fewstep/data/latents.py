"""Prepared VAE latents as a training dataset: a fresh latent from the stored posterior at every draw.

Per image the directory holds the SD-VAE posterior mean μ and standard deviation σ, each (C, h, w) with
h = resolution / 8 (``docs/design/tvm.md`` §3). Every training draw samples ``z = μ + σ·ε`` (ε ~ N(0, I)) and
normalises it per channel::

    x = (z − raw_mean) / raw_std · final_std          (final_std = 1, no 0.18215 factor)

Decoding (``docs/design/tvm.md`` §4) undoes it, ``z = (x − bias) / scale`` with ``scale = final_std / raw_std`` and
``bias = −raw_mean · scale``, and runs the VAE decoder (:mod:`fewstep.data.vae`).

Datasets registered here: ``latents:DIR`` (a directory from ``fewstep prepare``, normalised with the
statistics measured there) and ``imagenet-latents-256`` / ``imagenet-latents-512`` (a prepared ImageNet
directory from ``data.root`` or ``$FEWSTEP_DATA``, normalised with the paper's constants and decoded with
``stabilityai/sd-vae-ft-ema``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec
from fewstep.data.base import DataError, DataNotFoundError
from fewstep.data.store import META_FILE, ArrowLatents, TensorLatents, read_meta
from fewstep.registry import datasets as registry

DECODER_VAE = "stabilityai/sd-vae-ft-ema"   # docs/design/tvm.md §3: the VAE the official code decodes with
_ITEM_SEED = 0x5DEECE66D                   # decorrelates __getitem__'s per-index draws from other streams


@dataclass(frozen=True)
class LatentFormat:
    """How normalised latents relate to a VAE (``docs/design/tvm.md`` §3–4).

    Attributes:
        vae: diffusers ``AutoencoderKL`` used to decode (hub id or local directory).
        resolution: side of the images, in pixels.
        latent_shape: (C, h, w) of one latent.
        raw_mean, raw_std: per-channel mean and standard deviation of sampled raw latents z (C values each).
        final_std: standard deviation of the normalised latents (TVM 1.0; EDM2 0.5).
    """

    vae: str
    resolution: int
    latent_shape: tuple[int, int, int]
    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    final_std: float = 1.0

    def __post_init__(self) -> None:
        c = self.latent_shape[0]
        if len(self.raw_mean) != c or len(self.raw_std) != c or min(self.raw_std) <= 0:
            raise DataError(f"latent format needs {c} raw_mean and {c} positive raw_std values, got "
                            f"{list(self.raw_mean)} and {list(self.raw_std)}")

    def scale_bias(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``scale = final_std / raw_std`` and ``bias = −raw_mean · scale``, shaped (1, C, 1, 1) on ``like``'s
        device and dtype (cached: no host→device copy per training step; never modify them in place)."""
        return _scale_bias(self, like.device, like.dtype)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw latents (B, C, h, w) → training units: ``z · scale + bias``."""
        scale, bias = self.scale_bias(z)
        return z * scale + bias

    def denormalize(self, x: Tensor) -> Tensor:
        """Training units (B, C, h, w) → raw VAE latents: ``(x − bias) / scale``."""
        scale, bias = self.scale_bias(x)
        return (x - bias) / scale

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@functools.lru_cache(maxsize=64)
def _scale_bias(fmt: LatentFormat, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    std = torch.tensor(fmt.raw_std, dtype=torch.float64)
    scale = fmt.final_std / std
    bias = -torch.tensor(fmt.raw_mean, dtype=torch.float64) * scale
    shape = (1, len(fmt.raw_std), 1, 1)
    return scale.to(device, dtype).view(shape), bias.to(device, dtype).view(shape)


IMAGENET_256 = LatentFormat(vae=DECODER_VAE, resolution=256, latent_shape=(4, 32, 32),
                            raw_mean=(0.86488, -0.27787343, 0.21616915, 0.3738409),
                            raw_std=(4.85503674, 5.31922414, 3.93725398, 3.9870003))
IMAGENET_512 = LatentFormat(vae=DECODER_VAE, resolution=512, latent_shape=(4, 64, 64),
                            raw_mean=(1.56, -0.695, 0.483, 0.729), raw_std=(5.27, 5.91, 4.21, 4.31))
IMAGENET_FORMATS = {256: IMAGENET_256, 512: IMAGENET_512}   # docs/design/tvm.md §3 table (512 px: EDM2's values)


def format_from_meta(meta: dict) -> LatentFormat:
    """The format a prepared directory measured (its VAE and per-channel statistics)."""
    return LatentFormat(vae=meta["vae"], resolution=int(meta["resolution"]),
                        latent_shape=tuple(int(v) for v in meta["latent_shape"]),
                        raw_mean=tuple(float(v) for v in meta["raw_mean"]),
                        raw_std=tuple(float(v) for v in meta["raw_std"]), final_std=float(meta.get("final_std", 1.0)))


class LatentDataset(Dataset):
    """A prepared directory as ``(x, y)`` items with a fresh latent per draw.

    Training goes through :meth:`get_stored` (the posterior, on the CPU) and :meth:`realize` (the draw
    and the normalisation, on the training device) — :class:`~fewstep.data.loader.BatchStream` seeds
    ``realize``'s generator from the stream position, so a resumed run continues the same latents.
    ``dataset[i]`` draws from a generator seeded with (seed, i): the same x for the same i.

    Args:
        root: the prepared directory.
        name: dataset name for the spec.
        fmt: normalisation and decoder to use (default: the statistics measured by ``prepare``).
        seed: seed of ``dataset[i]``'s draws.

    Attributes:
        spec: C = latent channels, resolution = h, kind ``latents``.
        latent_format: the :class:`LatentFormat` applied.
        measured: the format ``prepare`` measured (the same as ``latent_format`` unless ``fmt`` was given).
        labels: (N,) int64; class_names: names of the classes or ``None``; meta: ``latents.json``.
    """

    def __init__(self, root: str | os.PathLike, *, name: str, fmt: LatentFormat | None = None, seed: int = 0):
        self.root = Path(root).expanduser()
        meta = read_meta(self.root)
        measured = format_from_meta(meta)
        fmt = fmt or measured
        if tuple(fmt.latent_shape) != tuple(measured.latent_shape):
            raise DataError(f"{name}: {self.root} holds latents of shape {measured.latent_shape} "
                            f"({measured.resolution} px), but {fmt.latent_shape} ({fmt.resolution} px) are needed")
        self._setup(ArrowLatents(self.root, meta), meta, measured, fmt, name, seed)

    @classmethod
    def from_tensors(cls, mean: Tensor, std: Tensor, labels: Tensor, fmt: LatentFormat, *, name: str = "latents",
                     num_classes: int = 0, class_names: Sequence[str] | None = None, seed: int = 0) -> LatentDataset:
        """An in-memory dataset of posteriors mean and std (N, C, h, w) and labels (N,) (tests, benchmarks,
        latents already in RAM); normalised and decoded with ``fmt``."""
        if tuple(mean.shape[1:]) != tuple(fmt.latent_shape) or mean.shape != std.shape or labels.shape != mean.shape[:1]:
            raise DataError(f"need mean and std (N, {', '.join(map(str, fmt.latent_shape))}) and labels (N,), got "
                            f"{tuple(mean.shape)}, {tuple(std.shape)}, {tuple(labels.shape)}")
        self = cls.__new__(cls)
        self.root = None
        meta = {"num_classes": num_classes, "class_names": list(class_names) if class_names else None,
                "resolution": fmt.resolution, "vae": fmt.vae}
        self._setup(TensorLatents(mean, std, labels), meta, fmt, fmt, name, seed)
        return self

    def _setup(self, store: Any, meta: dict, measured: LatentFormat, fmt: LatentFormat, name: str, seed: int) -> None:
        self.store, self.meta, self.measured, self.latent_format, self.seed = store, meta, measured, fmt, seed
        self.labels = store.labels
        self.class_names = meta.get("class_names")
        c, h, _ = measured.latent_shape
        self.spec = DataSpec(name=name, channels=c, resolution=h, num_classes=int(meta["num_classes"]),
                             num_items=len(store), kind="latents")

    def __len__(self) -> int:
        return len(self.store)

    def posterior(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Stored posterior of items ``indices`` (B,): mean and std, each (B, C, h, w) float32."""
        stored = self.store.gather(torch.as_tensor(indices, dtype=torch.int64).reshape(-1))
        return stored.chunk(2, dim=1)

    def get_stored(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """What the loader moves to the device: mean ‖ std (B, 2C, h, w) float32 and labels (B,) int64."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        return self.store.gather(indices), self.labels[indices]

    def realize(self, stored: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A fresh normalised latent per row: ``normalize(μ + σ·ε)``, ε ~ N(0, I) from ``generator``
        (on ``stored``'s device). ``stored`` is (B, 2C, h, w) from :meth:`get_stored`; returns (B, C, h, w)."""
        mean, std = stored.float().chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.latent_format.normalize(mean + std * eps)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(x, y)``: x (C, h, w) float32 normalised latent (drawn with seed (seed, index)), y 0-d int64."""
        stored, y = self.get_stored(torch.tensor([int(index)]))
        generator = torch.Generator().manual_seed((self.seed * _ITEM_SEED + int(index)) % (1 << 63))
        return self.realize(stored, generator)[0], y[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec}, root={str(self.root)!r})"


def _argument(cfg: DataConfig) -> str:
    arg = cfg.name.split(":", 1)[1] if ":" in cfg.name else ""
    if not arg:
        raise DataError(f"data name {cfg.name!r} is missing its directory: use latents:DIR")
    return arg


def _check(dataset: LatentDataset, cfg: DataConfig) -> LatentDataset:
    meta = dataset.meta
    if cfg.split != meta.get("split", cfg.split):
        raise DataError(f"{cfg.name}: {dataset.root} holds the {meta['split']!r} split, not {cfg.split!r}; "
                        f"prepare that split into its own directory")
    if cfg.resolution is not None and cfg.resolution != int(meta["resolution"]):
        raise DataError(f"{cfg.name}: {dataset.root} was prepared at {meta['resolution']} px, but "
                        f"data.resolution={cfg.resolution}; prepare it again at that resolution")
    return dataset


def imagenet_dirs(resolution: int, root: str | os.PathLike | None) -> list[Path]:
    """Where ``imagenet-latents-R`` is looked for: ``data.root``, then ``$FEWSTEP_DATA/imagenet-latents-R``,
    then ``$FEWSTEP_DATA`` itself."""
    dirs = [Path(root).expanduser()] if root else []
    if env := os.environ.get("FEWSTEP_DATA"):
        dirs += [Path(env).expanduser() / f"imagenet-latents-{resolution}", Path(env).expanduser()]
    return dirs


def load_imagenet_latents(cfg: DataConfig, resolution: int) -> LatentDataset:
    """``imagenet-latents-R``: the first of :func:`imagenet_dirs` holding latents, with the paper's constants."""
    fmt = IMAGENET_FORMATS[resolution]
    dirs = imagenet_dirs(resolution, cfg.root)
    found = dirs[0] if cfg.root else next((d for d in dirs if (d / META_FILE).is_file()), None)
    if found is None:
        where = "\n".join(f"  {d}" for d in dirs) or "  (none: data.root and $FEWSTEP_DATA are unset)"
        raise DataNotFoundError(
            f"{cfg.name}: no prepared ImageNet latents found. Searched:\n{where}\nEncode ImageNet once with\n"
            f"  fewstep prepare --data imagefolder:/path/to/imagenet/train --resolution {resolution} "
            f"--vae {DECODER_VAE} --out DIR\n(under `accelerate launch -m fewstep.cli` to use every GPU), then "
            f"pass --set data.root=DIR, or make DIR $FEWSTEP_DATA/imagenet-latents-{resolution}")
    dataset = _check(LatentDataset(found, name=cfg.name, fmt=fmt), cfg)
    if int(dataset.meta["resolution"]) != resolution:
        raise DataError(f"{cfg.name}: {found} was prepared at {dataset.meta['resolution']} px, not {resolution}")
    return dataset


def latent_format_for(cfg: DataConfig) -> LatentFormat:
    """The latent format of a latent dataset config without loading its arrays (for decoding samples):
    the paper's constants for ``imagenet-latents-R``, ``DIR/latents.json`` for ``latents:DIR``."""
    name = cfg.name
    for resolution, fmt in IMAGENET_FORMATS.items():
        if name == f"imagenet-latents-{resolution}":
            return fmt
    if name.startswith("latents:"):
        return format_from_meta(read_meta(_argument(cfg)))
    raise DataError(f"dataset {name!r} is not a latent dataset (latents:DIR or imagenet-latents-256/512)")


@registry.register("latents", summary="latents:DIR: VAE latents from `fewstep prepare` (posterior per image, "
                                      "a fresh latent each step, normalised with the measured statistics)")
def latents(cfg: DataConfig) -> LatentDataset:
    """``latents:DIR``: a prepared directory, normalised with the statistics measured when it was made."""
    return _check(LatentDataset(_argument(cfg), name=cfg.name), cfg)


@registry.register("imagenet-latents-256", summary="ImageNet 256 px SD-VAE latents (4×32×32) prepared by "
                                                   "`fewstep prepare`, from data.root or $FEWSTEP_DATA; TVM constants")
def imagenet_latents_256(cfg: DataConfig) -> LatentDataset:
    return load_imagenet_latents(cfg, 256)


@registry.register("imagenet-latents-512", summary="ImageNet 512 px SD-VAE latents (4×64×64) prepared by "
                                                   "`fewstep prepare`, from data.root or $FEWSTEP_DATA; EDM2 constants")
def imagenet_latents_512(cfg: DataConfig) -> LatentDataset:
    return load_imagenet_latents(cfg, 512)


def describe(dataset: Any) -> dict:
    """What a dataset reports, so backbones and recipes are configured from it: shape, channels, classes,
    kind and normalisation."""
    spec: DataSpec = dataset.spec
    out = {"name": spec.name, "kind": spec.kind, "shape": [spec.channels, spec.resolution, spec.resolution],
           "channels": spec.channels, "num_classes": spec.num_classes, "num_items": spec.num_items}
    fmt = getattr(dataset, "latent_format", None)
    if fmt is not None:
        out["normalization"] = {"rule": "x = (z − raw_mean) / raw_std · final_std, z = mean + std·ε per draw",
                                **fmt.to_dict()}
    elif spec.kind == "pixels":
        out["normalization"] = {"rule": "x = u8 / 127.5 − 1 ∈ [−1, 1]"}
    names: Sequence[str] | None = getattr(dataset, "class_names", None)
    if names:
        out["class_names"] = list(names)
    return out
