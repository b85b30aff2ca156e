"""Datasets of ``(x, y)`` items (x float32 (C, H, W), y int64) and the training batch stream.

Pixel datasets yield x in [−1, 1] (``u8 / 127.5 − 1``); latent datasets yield normalised VAE latents, a
fresh draw from the stored posterior each time (:mod:`fewstep.data.latents`). Importing this package
registers the in-tree datasets: ``fashion-mnist``, ``imagefolder``, ``hub``, ``toy2d``…, ``latents`` and
``imagenet-latents-256/512``. ``datasets``, pyarrow and diffusers are imported only where they are used.
"""
from fewstep.data.base import (DataError, DataNotFoundError, ImageDataset, InMemoryImageDataset,
                               load_dataset, u8_to_float)
from fewstep.data.fashion_mnist import CLASS_NAMES, FashionMNIST, read_idx
from fewstep.data.hf import HFImageDataset, center_crop, from_hf
from fewstep.data.latents import (IMAGENET_256, IMAGENET_512, LatentDataset, LatentFormat, describe,
                                  latent_format_for)
from fewstep.data.loader import BatchStream, IndexStream, epoch_permutation, noise_seed
from fewstep.data.toy2d import Toy2D

__all__ = [
    "BatchStream", "CLASS_NAMES", "DataError", "DataNotFoundError", "FashionMNIST", "HFImageDataset",
    "IMAGENET_256", "IMAGENET_512", "ImageDataset", "InMemoryImageDataset", "IndexStream", "LatentDataset",
    "LatentFormat", "center_crop", "describe", "epoch_permutation", "from_hf", "latent_format_for",
    "load_dataset", "noise_seed", "read_idx", "u8_to_float", "Toy2D",
]
