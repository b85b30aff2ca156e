"""The dataset contract, the in-memory dataset and :func:`load_dataset`.

Every dataset is a ``torch.utils.data.Dataset`` whose items are ``(x, y)``: ``x`` a float32 (C, H, W)
tensor in [−1, 1] (``u8 / 127.5 − 1``) and ``y`` a 0-d int64 label in ``[0, num_classes)`` (0 for
unconditional data). Each carries ``.spec`` (a :class:`~fewstep.contracts.DataSpec`). In-memory datasets
also have ``get_batch(indices)``, the fast batched path the training loader prefers over collation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec


class DataError(RuntimeError):
    """A dataset that cannot be loaded: missing files, malformed files, a missing extra or no network."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset whose files are in none of the searched places."""


@runtime_checkable
class ImageDataset(Protocol):
    """What :func:`load_dataset` returns: a map-style dataset of ``(x, y)`` with a ``spec``."""

    spec: DataSpec

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]: ...


def u8_to_float(images: Tensor) -> Tensor:
    """uint8 images (any shape) → float32 in [−1, 1]: ``u8 / 127.5 − 1`` (0 → −1, 255 → 1)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


class InMemoryImageDataset(Dataset):
    """Images held as one uint8 tensor, labels as one int64 tensor.

    Args:
        images: (N, C, H, W) uint8, H = W.
        labels: (N,) int64 in ``[0, num_classes)`` (zeros when unconditional).
        name: dataset name for the spec (as given to ``--data``).
        num_classes: number of classes (0 = unconditional).
        class_names: optional names of the ``num_classes`` classes.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, name: str, num_classes: int,
                 class_names: Sequence[str] | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (N, C, H, H) uint8, got {tuple(images.shape)} {images.dtype}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        check_labels(labels, num_classes, name)
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.class_names = list(class_names) if class_names is not None else None
        n, c, h, _ = images.shape
        self.spec = DataSpec(name=name, channels=c, resolution=h, num_classes=num_classes, num_items=n)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(x, y)``: x (C, H, W) float32 in [−1, 1], y a 0-d int64 label."""
        return u8_to_float(self.images[index]), self.labels[index]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Items ``indices`` (B,) int64 at once: x (B, C, H, W) float32 in [−1, 1], y (B,) int64."""
        return u8_to_float(self.images[indices]), self.labels[indices]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def load_dataset(cfg: DataConfig) -> Any:
    """The dataset ``cfg.name`` names, as an :class:`ImageDataset`.

    ``cfg.name`` is a registered dataset (``fashion-mnist``, or a plugin's), or ``PREFIX:ARG`` with a
    registered prefix: ``imagefolder:PATH`` (a local folder of images, one sub-folder per class) or
    ``hub:NAME`` (a Hugging Face Hub dataset). Unknown names raise
    :class:`~fewstep.registry.RegistryError` suggesting the closest ones.
    """
    from fewstep.registry import datasets

    name = check_data_config(cfg)
    dataset = datasets.get(name)(cfg)
    if not isinstance(getattr(dataset, "spec", None), DataSpec):
        raise DataError(f"dataset {cfg.name!r} ({datasets.entry(name).source}) returned an object without "
                        f"a DataSpec .spec: {type(dataset).__name__}")
    check_dataset(dataset, cfg.name)
    return dataset


def check_data_config(cfg: DataConfig) -> str:
    """Check a data config without loading anything (so ``--dry-run`` checks it too) and return the
    registered dataset that serves it: the name is registered (or ``PREFIX:ARG`` with a registered
    prefix, suggesting the closest names otherwise) and an explicit ``root`` exists. (Paths inside names,
    ``imagefolder:PATH``, are the loaders' to check: they say how to make what is missing.)"""
    from fewstep.config import ConfigError
    from fewstep.registry import datasets

    name = cfg.name
    if name not in datasets and ":" in name:
        name = name.split(":", 1)[0]
    datasets.entry(name)   # unknown names: RegistryError with the closest ones
    if cfg.root is not None and not Path(cfg.root).expanduser().exists():
        raise ConfigError(f"data.root={cfg.root!r} does not exist; pass the directory that holds the dataset's "
                          f"files, or leave data.root unset to use the default search path")
    for field, value, low in (("data.num_workers", cfg.num_workers, 0), ("data.resolution", cfg.resolution, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{field} must be ≥ {low}, got {value}")
    return name


def check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    """Labels (N,) must lie in ``[0, num_classes)`` (anything goes when unconditional); names the first offender."""
    if num_classes < 0:
        raise DataError(f"{name}: num_classes must be ≥ 0, got {num_classes}")
    if num_classes == 0 or labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
        return
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise DataError(f"{name}: label {int(labels[i])} of item {i} is outside [0, {num_classes}) "
                        f"({bad.numel()} labels out of range)")


def check_item(x: Any, y: Any, spec: DataSpec, index: int | str) -> None:
    """One ``(x, y)`` item (or batch, with ``index`` a description) must match ``spec``."""
    want = (spec.channels, spec.resolution, spec.resolution)
    if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape[-3:]) != want or x.ndim not in (3, 4):
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise DataError(f"{spec.name}: item {index} is {got}, but the dataset's spec says float (C, H, W) = "
                        f"{want}; images of mixed sizes or channel counts need data.resolution (image "
                        f"folders) or one size and channel count throughout")
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{spec.name}: label of item {index} has dtype {y.dtype}; labels are int64 class ids")
    check_labels(y.reshape(-1), spec.num_classes, f"{spec.name} (item {index})")


def check_dataset(dataset: Any, name: str) -> None:
    """Cheap checks before any compute: not empty, ``len`` agrees with the spec, stored labels in range,
    and the first and last items shaped as the spec says (the loader checks every later batch)."""
    spec: DataSpec = dataset.spec
    n = len(dataset)
    if n == 0:
        raise DataError(f"dataset {name!r} is empty (0 items); check data.root and data.split")
    if spec.num_items != n:
        raise DataError(f"dataset {name!r} has {n} items but its spec says num_items={spec.num_items}")
    if min(spec.channels, spec.resolution) < 1:
        raise DataError(f"dataset {name!r} has a spec with channels={spec.channels}, "
                        f"resolution={spec.resolution}; both must be ≥ 1")
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        check_labels(labels, spec.num_classes, repr(name))
    for i in sorted({0, n - 1}):
        x, y = dataset[i]
        check_item(x, y, spec, i)
