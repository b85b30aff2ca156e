"""Samples as files for outside evaluators: ADM's ``.npz`` format and folders of numbered PNGs.

* ``npz``: ``arr_0`` (N, H, W, C) uint8 in seed order, plus ``arr_1`` (N,) int64 labels for
  class-conditional runs, as guided-diffusion's ``scripts/image_sample.py`` writes them and ADM's
  ``evaluations/evaluator.py`` reads them. The images are written chunk by chunk into a memory-mapped
  ``.npy`` and stored uncompressed in the zip, so 50 000 ImageNet-256 samples (9.8 GB) never sit in memory.
* ``png``: ``<dir>/<seed:06d>.png``, one file per seed.

Image *i* comes from seed *i* alone (:func:`fewstep.sample.sample`), so files do not depend on the batch.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fewstep.contracts import Objective
from fewstep.images import write_png
from fewstep.sample import sample

FORMATS = ("grid", "npz", "png")


def export_samples(objective: Objective, seeds: Sequence[int], nfe: int, out: str | os.PathLike, fmt: str, *,
                   decode: Callable[[Tensor], Tensor], weights: str = "ema", guidance: float | None = None,
                   class_label: int | None = None, batch: int = 64, device: torch.device | None = None,
                   autocast: bool = False) -> Path:
    """Sample ``seeds`` at ``nfe`` jumps, convert with ``decode`` (samples → (N, C, H, W) uint8) and write
    them as ``fmt`` (``npz`` or ``png``) to ``out``; returns the path written."""
    if fmt not in ("npz", "png"):
        raise ValueError(f"export format must be npz or png, got {fmt!r}")
    out = Path(out)
    seeds = list(seeds)
    writer = _NpzWriter(out, len(seeds)) if fmt == "npz" else None
    labels = []
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        result = sample(objective, chunk, nfe, weights=weights, guidance=guidance, class_label=class_label,
                        batch_size=len(chunk), device=device, autocast=autocast)
        images = decode(result.images)
        if result.labels is not None:
            labels.append(result.labels)
        if writer is not None:
            writer.add(images)
        else:
            for seed, image in zip(chunk, images):
                write_png(out / f"{seed:06d}.png", image)
    if writer is not None:
        writer.close(torch.cat(labels) if labels else None)
    return out


class _NpzWriter:
    """Fill ``arr_0`` (N, H, W, C) uint8 chunk by chunk, then zip it (stored) as ADM's evaluator expects."""

    def __init__(self, path: Path, n: int):
        self.path, self.n, self.filled = path, n, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmpdir = tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        self.array = None

    def add(self, images: Tensor) -> None:
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        if self.array is None:
            self.array = np.lib.format.open_memmap(os.path.join(self.tmpdir, "arr_0.npy"), mode="w+",
                                                   dtype=np.uint8, shape=(self.n, *nhwc.shape[1:]))
        self.array[self.filled:self.filled + len(nhwc)] = nhwc
        self.filled += len(nhwc)

    def close(self, labels: Tensor | None) -> None:
        if self.array is None or self.filled != self.n:
            raise RuntimeError(f"npz writer got {self.filled} of {self.n} images")
        self.array.flush()
        del self.array
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(os.path.join(self.tmpdir, "arr_0.npy"), "arr_0.npy")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels.numpy().astype(np.int64))
        os.replace(tmp, self.path)
        for name in os.listdir(self.tmpdir):
            os.remove(os.path.join(self.tmpdir, name))
        os.rmdir(self.tmpdir)


__all__ = ["FORMATS", "export_samples"]
