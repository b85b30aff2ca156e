"""Load a trained run (or an exported model) in Python and sample from it.

    import fewstep

    model = fewstep.load("runs/00003-smoke-tvm-dit-debug")        # or an exported model directory
    images = model.sample(range(16), nfe=1)                      # (16, C, H, W) uint8
    images = model.sample([0, 1, 2], nfe=4, labels=3)            # every image of class 3

Image *i* depends only on seed *i* (the same images as ``fewstep sample`` for the same seeds, weights
and device, whatever ``batch``). Latent runs are decoded through their VAE (``fewstep[latent]``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from fewstep.checkpoints import Checkpoint
from fewstep.config import RunConfig
from fewstep.contracts import DataSpec, Objective
from fewstep.sample import SampleResult, parse_device, parse_seeds, sample, sampling_autocast


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU (``"auto"`` means the same); a device name this
    build or machine cannot use is one clear error (:func:`fewstep.sample.parse_device`)."""
    if isinstance(device, torch.device):
        return device
    return parse_device(device or "auto")


def _seed_list(seeds: Iterable[int] | str | int) -> list[int]:
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    if isinstance(seeds, int):
        return [seeds]
    out = [int(s) for s in seeds]
    if any(s < 0 for s in out):
        raise ValueError(f"seeds must be ≥ 0, got {min(out)}")
    return out


@dataclass
class Model:
    """A trained model ready to sample: what :func:`load` returns.

    Attributes:
        objective: the objective module, in eval mode (``objective.backbone``, its EMA tracks). For an
            exported model only the exported weights are materialised; modules sampling never touches
            (teachers, other tracks) stay on the ``meta`` device and hold no memory.
        config: the run's resolved :class:`~fewstep.config.RunConfig`.
        spec: what the data looks like (channels, resolution, classes, ``pixels``/``latents``/``points``).
        weights: the weights sampled with (``online`` or an EMA track name).
        device: where sampling runs.
        checkpoint: the checkpoint (or exported model) read: ``.path``, ``.step``, ``.manifest``.
    """

    objective: Objective
    config: RunConfig
    spec: DataSpec
    weights: str
    device: torch.device
    checkpoint: Checkpoint
    _decode: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    @property
    def autocast(self) -> bool:
        """bf16 autocast on CUDA for runs trained in bf16 (:func:`fewstep.sample.sampling_autocast`)."""
        return sampling_autocast(self.device, self.config)

    def decoder(self) -> Callable[[Tensor], Tensor]:
        """Samples → uint8 images (the VAE for latents, loaded on first use)."""
        if self._decode is None:
            from fewstep.sample import output_decoder

            self._decode = output_decoder(self.config.data, self.spec, device=self.device)
        return self._decode

    def generate(self, seeds: Iterable[int] | str | int, nfe: int = 1, labels: int | Sequence[int] | None = None,
                 guidance: float | None = None, batch: int | None = None) -> SampleResult:
        """Like :meth:`sample`, returning the full :class:`~fewstep.sample.SampleResult` (samples in data
        units, labels, evaluations, and ``pixels`` for image data)."""
        decode = None if self.spec.kind == "points" else self.decoder()
        return sample(self.objective, _seed_list(seeds), nfe, weights=self.weights, class_label=labels,
                      guidance=guidance, batch_size=batch or 64, device=self.device, autocast=self.autocast,
                      decode=decode)

    def sample(self, seeds: Iterable[int] | str | int, nfe: int = 1, labels: int | Sequence[int] | None = None,
               guidance: float | None = None, batch: int | None = None) -> Tensor:
        """One image per seed with ``nfe`` jumps of the objective's sampler.

        Args:
            seeds: sample seeds (a list or range of ints, one int, or a string such as ``"0-63"``);
                image i depends only on seeds[i].
            nfe: network jumps per image.
            labels: ``None`` (a random class per seed, as ``fewstep sample``), one class for every image,
                or one class per seed.
            guidance: CFG scale w (objectives with guidance), default: the objective's own.
            batch: images per forward (default 64); does not change the images.
        Returns:
            (N, C, H, W) uint8 images on the CPU (VAE-decoded for latent runs). For point data (toy2d)
            the samples themselves, (N, D) float32.
        """
        result = self.generate(seeds, nfe, labels=labels, guidance=guidance, batch=batch)
        return result.pixels if result.pixels is not None else result.images.flatten(1)


def load(path: str | os.PathLike, weights: str | None = "ema", device: torch.device | str | None = None) -> Model:
    """Load a run directory (its newest valid checkpoint), one checkpoint directory, or a model written by
    ``fewstep export``, ready to :meth:`Model.sample`.

    Args:
        path: run, checkpoint or exported model directory.
        weights: ``online`` or an EMA track name (``None``: the run's ``sample.weights``). An exported
            model holds one set of weights; naming another is an error.
        device: where to sample (default: CUDA when available, else the CPU).
    """
    from fewstep.build import load_objective, spec_from_dict

    device = default_device(device)
    objective, cfg, ckpt = load_objective(path, device=device, weights=weights)
    weights = weights or cfg.sample.weights
    valid = ["online", *objective.ema.keys()]
    if weights not in valid:
        raise ValueError(f"{path} has no weights named {weights!r} (valid: {', '.join(valid)})")
    return Model(objective=objective, config=cfg, spec=spec_from_dict(ckpt.field("data_spec")), weights=weights,
                 device=device, checkpoint=ckpt)


def describe(model: Model) -> dict[str, Any]:
    """The facts a model card states: objective, backbone, data, images seen, parameters."""
    net = model.objective.sampling_net(model.weights)
    manifest = model.checkpoint.manifest
    return {"objective": model.config.objective.name, "backbone": model.config.backbone.name,
            "recipe": model.config.recipe, "data": model.config.data.name, "kind": model.spec.kind,
            "resolution": model.spec.resolution, "channels": model.spec.channels,
            "num_classes": model.spec.num_classes, "step": model.checkpoint.step, "kimg": manifest.get("kimg"),
            "parameters": sum(p.numel() for p in net.parameters()), "weights": model.weights,
            "path": str(Path(model.checkpoint.path))}
