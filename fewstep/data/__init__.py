"""Datasets of ``(x, y)`` items (x float32 (C, H, W) in [−1, 1], y int64) and the training batch stream.

Importing this package registers the in-tree datasets: ``fashion-mnist``, ``imagefolder`` and ``hub``.
"""
from fewstep.data.base import (DataError, DataNotFoundError, ImageDataset, InMemoryImageDataset,
                               load_dataset, u8_to_float)
from fewstep.data.fashion_mnist import CLASS_NAMES, FashionMNIST, read_idx
from fewstep.data.hf import HFImageDataset, center_crop, from_hf
from fewstep.data.loader import BatchStream, IndexStream, epoch_permutation
from fewstep.data.toy2d import Toy2D

__all__ = [
    "BatchStream", "CLASS_NAMES", "DataError", "DataNotFoundError", "FashionMNIST", "HFImageDataset",
    "ImageDataset", "InMemoryImageDataset", "IndexStream", "center_crop", "epoch_permutation", "from_hf",
    "load_dataset", "read_idx", "u8_to_float", "Toy2D",
]
