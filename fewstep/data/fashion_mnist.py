"""Fashion-MNIST (the default data): IDX files parsed in-tree, held in memory as uint8.

60 000 train / 10 000 test 28×28 grayscale images in 10 classes (Xiao et al., 2017), padded with the
background value to 32×32 so a patch-2 DiT sees 16×16 = 256 tokens. The four IDX files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not) are looked up in ``data.root``, then
``$FEWSTEP_DATA`` (the directory itself or its ``fashion-mnist`` sub-directory), then
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import torch
from torch import Tensor

from fewstep.config import DataConfig
from fewstep.data.base import DataError, DataNotFoundError, InMemoryImageDataset
from fewstep.registry import datasets

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049   # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim
NATIVE_SIZE, DEFAULT_RESOLUTION = 28, 32

HOW_TO_GET = (
    "To get the files:\n"
    "  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist   (or: make data)\n"
    "  - elsewhere: download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,\n"
    "    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from\n"
    "    https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a directory DIR,\n"
    "    then pass --set data.root=DIR or export FEWSTEP_DATA=DIR")


# ---------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike, magic: int) -> Tensor:
    """An IDX file (``.gz`` or raw) of unsigned bytes as a uint8 tensor shaped by its header.

    The header is a big-endian int32 magic number (``0x08`` = uint8 in byte 3, the number of dims in
    byte 4), then one big-endian int32 per dimension. Raises :class:`DataError` naming the file on a
    wrong magic number, a truncated or oversized body, or a corrupt gzip stream.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind: magic number {found}, "
                        f"expected {magic}")
    ndim = found & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, header needs {header}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw)} bytes, expected {expected} for shape {tuple(dims)}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(dims)


def search_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for the IDX files, in order: ``root`` (itself, then its ``fashion-mnist``
    sub-directory) when given, and nothing else: a run records the root it was given, so it must not
    silently read another copy; without ``root``, ``$FEWSTEP_DATA`` (itself, then its ``fashion-mnist``
    sub-directory) and ``/usr/share/datasets/fashion-mnist``."""
    if root:
        return [Path(root).expanduser(), Path(root).expanduser() / "fashion-mnist"]
    dirs = []
    if env := os.environ.get("FEWSTEP_DATA"):
        dirs += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    dirs.append(SYSTEM_DIR)
    return dirs


def find_files(split: str, root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split`` in the first searched directory that has
    both (uncompressed preferred over ``.gz``); :class:`DataNotFoundError` listing the searched
    directories and how to get the files otherwise."""
    if split not in FILES:
        raise DataError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    dirs = search_dirs(root)
    for d in dirs:
        found = [_existing(d / stem) for stem in FILES[split]]
        if all(found):
            return found[0], found[1]
    searched = "\n".join(f"  - {d}" for d in dirs)
    names = " and ".join(f"{stem}[.gz]" for stem in FILES[split])
    raise DataNotFoundError(f"Fashion-MNIST {split} files ({names}) not found. Searched:\n{searched}\n"
                            f"{HOW_TO_GET}")


def _existing(stem: Path) -> Path | None:
    for path in (stem, stem.with_name(stem.name + ".gz")):
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------
class FashionMNIST(InMemoryImageDataset):
    """Fashion-MNIST in memory: items ``(x, y)`` with x (1, R, R) float32 in [−1, 1] and y int64 in 0–9.

    Images are padded from 28×28 to R×R with the background value (pixel 0, i.e. −1); R = 32 by default.
    The whole split stays uint8 in memory (60 000 × 1 × 32 × 32 = 61 MB for train).

    Args:
        root: directory holding the IDX files, searched first (see :func:`search_dirs`).
        split: ``train`` (60 000 items) or ``test`` (10 000).
        resolution: padded side R ≥ 28; ``None`` means 32.
        name: dataset name recorded in the spec.
    """

    def __init__(self, root: str | os.PathLike | None = None, split: str = "train",
                 resolution: int | None = None, name: str = "fashion-mnist"):
        resolution = DEFAULT_RESOLUTION if resolution is None else resolution
        image_path, label_path = find_files(split, root)
        images = read_idx(image_path, IMAGES_MAGIC)
        labels = read_idx(label_path, LABELS_MAGIC)
        if images.ndim != 3:
            raise DataError(f"{image_path} holds shape {tuple(images.shape)}, expected (N, H, W)")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{image_path} has {images.shape[0]} images but {label_path} has "
                            f"{labels.shape[0]} labels")
        if labels.numel() and int(labels.max()) >= len(CLASS_NAMES):
            raise DataError(f"{label_path} has label {int(labels.max())}, expected 0–{len(CLASS_NAMES) - 1}")
        n, h, w = images.shape
        if resolution < max(h, w):
            raise DataError(f"data.resolution={resolution} is smaller than Fashion-MNIST's {h}×{w} images; "
                            f"use a resolution ≥ {max(h, w)} (the images are padded, not resized)")
        padded = torch.zeros(n, 1, resolution, resolution, dtype=torch.uint8)
        top, left = (resolution - h) // 2, (resolution - w) // 2
        padded[:, 0, top:top + h, left:left + w] = images
        super().__init__(padded, labels.to(torch.int64), name=name, num_classes=len(CLASS_NAMES),
                         class_names=CLASS_NAMES)
        self.split, self.files = split, (image_path, label_path)


@datasets.register("fashion-mnist", summary="Fashion-MNIST 28×28 grayscale, 10 classes, padded to 32×32 "
                                            "(60k train / 10k test; IDX files, see scripts/setup-data.sh)")
def fashion_mnist(cfg: DataConfig) -> FashionMNIST:
    """Fashion-MNIST from ``cfg.root``/``$FEWSTEP_DATA``/the Debian path, ``cfg.split``, ``cfg.resolution``."""
    return FashionMNIST(root=cfg.root, split=cfg.split, resolution=cfg.resolution, name=cfg.name)
