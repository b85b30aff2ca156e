"""Image datasets through Hugging Face ``datasets``: ``imagefolder:PATH`` and ``hub:NAME``.

``datasets`` and Pillow are imported only here, inside the loaders, so the package and Fashion-MNIST
work without them (``pip install 'fewstep[hf]'`` adds them). Images stay in ``datasets``' memory-mapped
Arrow files and are decoded one item at a time, so large folders are never loaded into memory.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec
from fewstep.data.base import DataError, DataNotFoundError, u8_to_float
from fewstep.registry import datasets as registry

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")
SIZE_SCAN = 10_000   # image headers checked up front when no resolution is set; later items on access
TRUTHY = ("1", "ON", "YES", "TRUE")


def center_crop(image: Any, resolution: int) -> Any:
    """ADM-style centre crop of a PIL image to ``resolution`` × ``resolution``: halve with BOX filtering
    while the short side is ≥ 2·resolution, resize the short side to ``resolution`` (BICUBIC), crop."""
    from PIL import Image

    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(max(resolution, round(s * scale)) for s in image.size),
                         resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class HFImageDataset(Dataset):
    """A ``datasets.Dataset`` of images seen as ``(x, y)`` items, decoded lazily per item.

    Items: x (3, R, R) float32 in [−1, 1] (images converted to RGB; centre-cropped and resized to R when
    ``resolution`` was given, else every image must already be R × R), y a 0-d int64 label (0 when the
    data is unconditional).

    Args:
        hf: the ``datasets.Dataset`` (one split).
        name: dataset name for the spec.
        image_column: column of ``datasets.Image`` type.
        label_column: integer label column, or ``None`` for unconditional data.
        num_classes: number of classes (0 = unconditional).
        resolution: side R to crop and resize to, or ``None`` to require images of one square size.
        class_names: names of the classes, if known.
    """

    def __init__(self, hf: Any, *, name: str, image_column: str, label_column: str | None,
                 num_classes: int, resolution: int | None, class_names: Sequence[str] | None = None):
        columns = [image_column] + ([label_column] if label_column else [])
        self.hf = hf.select_columns(columns)
        self.image_column, self.label_column = image_column, label_column
        self.class_names = list(class_names) if class_names else None
        self.crop = resolution is not None
        if resolution is None:
            resolution = _common_size(self.hf, image_column, name)
        self.spec = DataSpec(name=name, channels=3, resolution=resolution, num_classes=num_classes,
                             num_items=len(self.hf))

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(x, y)``: x (3, R, R) float32 in [−1, 1], y a 0-d int64 label."""
        try:
            row = self.hf[int(index)]
            image = row[self.image_column].convert("RGB")
        except Exception as exc:   # PIL's UnidentifiedImageError, OSError of a truncated file …
            raise DataError(f"{self.spec.name}: item {index} ({_source(self.hf, self.image_column, index)}) is not a "
                            f"readable image ({exc}); remove or replace that file") from exc
        r = self.spec.resolution
        if self.crop:
            image = center_crop(image, r)
        elif image.size != (r, r):
            raise DataError(f"{self.spec.name}: item {index} is {_wh(image.size)} but earlier images are "
                            f"{r}×{r}; set data.resolution to crop and resize all images to one size")
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        y = int(row[self.label_column]) if self.label_column else 0
        return u8_to_float(x), torch.tensor(y, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def from_hf(hf: Any, *, name: str, resolution: int | None) -> HFImageDataset:
    """Wrap one split of a ``datasets.Dataset``: finds the image column (``image``/``img`` or the first
    ``Image`` feature) and the label column (``label``/``labels``/``fine_label``; a ``ClassLabel`` gives
    the number of classes and their names, an integer column max + 1; one class counts as none)."""
    import datasets

    features = hf.features
    image_column = next((c for c in IMAGE_COLUMNS if c in features), None) or next(
        (c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None or not isinstance(features[image_column], datasets.Image):
        raise DataError(f"{name}: no image column found (looked for {', '.join(IMAGE_COLUMNS)} or any "
                        f"Image feature); columns: {', '.join(features)}")
    label_column = next((c for c in LABEL_COLUMNS if c in features), None)
    num_classes, class_names = 0, None
    if label_column is not None:
        feature = features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            num_classes, class_names = feature.num_classes, feature.names
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            num_classes = int(max(hf[label_column], default=-1)) + 1
        if num_classes <= 1:
            label_column, num_classes, class_names = None, 0, None
    return HFImageDataset(hf, name=name, image_column=image_column, label_column=label_column,
                          num_classes=num_classes, resolution=resolution, class_names=class_names)


def _common_size(hf: Any, column: str, name: str) -> int:
    """The one square side of the first :data:`SIZE_SCAN` images (read from headers, not decoded)."""
    import datasets
    from PIL import Image

    raw = hf.select(range(min(len(hf), SIZE_SCAN))).cast_column(column, datasets.Image(decode=False))
    first = None
    for i, item in enumerate(raw[column]):
        try:
            with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                size = image.size
        except Exception as exc:   # PIL's UnidentifiedImageError, an unreadable file …
            raise DataError(f"{name}: item {i} ({item.get('path') or 'embedded bytes'}) is not a readable image "
                            f"({exc}); remove or replace that file") from exc
        if first is None:
            first = (i, size)
        elif size != first[1]:
            raise DataError(f"{name}: images differ in size: item {first[0]} is {_wh(first[1])}, item {i} is "
                            f"{_wh(size)}; set data.resolution (--set data.resolution=64) to centre-crop "
                            f"and resize them")
    if first is None:
        raise DataError(f"{name}: the dataset has no images")
    if first[1][0] != first[1][1]:
        raise DataError(f"{name}: images are {_wh(first[1])}, not square; set data.resolution to "
                        f"centre-crop and resize them")
    return first[1][0]


def _source(hf: Any, column: str, index: int) -> str:
    """The file behind item ``index`` of an image column (read without decoding), for messages."""
    import datasets

    try:
        item = hf.select([int(index)]).cast_column(column, datasets.Image(decode=False))[0][column]
        return item.get("path") or "embedded bytes"
    except Exception:   # naming the file must never hide the original error
        return "file unknown"


def _wh(size: tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


def _import_datasets(what: str) -> Any:
    try:
        import datasets
        import PIL  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{what} needs the Hugging Face 'datasets' package and Pillow "
                        f"({exc}); install them with: pip install 'fewstep[hf]'") from exc
    return datasets


def _argument(cfg: DataConfig, prefix: str, what: str) -> str:
    arg = cfg.name.split(":", 1)[1] if ":" in cfg.name else ""
    if not arg:
        raise DataError(f"data name {cfg.name!r} is missing its {what}: use {prefix}:{what.upper()}")
    return arg


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set)."""
    if any(os.environ.get(v, "").strip().upper() in TRUTHY for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (``None`` if a TCP connection to its endpoint opens within
    ``timeout`` seconds). Checked before a download, because without a network the libraries retry for
    half a minute and then blame the repository ("does not appear to have a file named config.json")."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no network connection to {endpoint} ({exc.strerror or exc})"
    return None


@registry.register("imagefolder", summary="imagefolder:PATH: a local folder of images (one sub-folder per "
                                          "class gives labels), via HF datasets; data.resolution crops")
def imagefolder(cfg: DataConfig) -> HFImageDataset:
    """``imagefolder:PATH``: HF ``imagefolder`` over PATH, split ``cfg.split``, labels from sub-folders."""
    path = Path(_argument(cfg, "imagefolder", "path")).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"{cfg.name}: {path} is not a directory")
    hf_datasets = _import_datasets("--data imagefolder:PATH")
    try:
        hf = hf_datasets.load_dataset("imagefolder", data_dir=str(path), split=cfg.split)
    except ValueError as exc:   # unknown split, no images found
        raise DataError(f"{cfg.name}: {exc}") from exc
    return from_hf(hf, name=cfg.name, resolution=cfg.resolution)


@registry.register("hub", summary="hub:NAME: a Hugging Face Hub dataset with an image/img column (needs a "
                                  "network); data.root is its cache directory")
def hub(cfg: DataConfig) -> HFImageDataset:
    """``hub:NAME``: ``datasets.load_dataset(NAME, split=cfg.split)``; fails at once when offline."""
    repo = _argument(cfg, "hub", "name")
    if hub_offline():
        raise DataError(f"{cfg.name}: hub datasets need a network, but the Hugging Face Hub is offline "
                        f"(HF_HUB_OFFLINE is set). Use a local folder with --data imagefolder:PATH, or a "
                        f"local dataset such as --data fashion-mnist")
    hf_datasets = _import_datasets("--data hub:NAME")
    if (reason := hub_unreachable()) is not None:
        raise DataError(f"{cfg.name}: cannot reach the Hub: {reason}. It is the network: connect this machine, "
                        f"or use a local folder with --data imagefolder:PATH")
    hf = hf_datasets.load_dataset(repo, split=cfg.split, cache_dir=cfg.root)
    return from_hf(hf, name=cfg.name, resolution=cfg.resolution)
