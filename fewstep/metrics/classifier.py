"""A small Fashion-MNIST classifier as a feature extractor: a fast Fréchet distance for small data.

``fmnist-classifier`` (:data:`fewstep.registry.extractors`) embeds the toolkit's Fashion-MNIST images
(1 × 32 × 32, the 28 × 28 digits padded with background) with a 3-block CNN trained on the Fashion-MNIST
train split by ``scripts/train-fmnist-classifier.py``; the features are its penultimate layer (the
128-d ReLU activations the class logits are read from). The Fréchet distance of these features
(FD-FMNIST) is to Fashion-MNIST what FID is to ImageNet-like images, at a fraction of the cost: no
resize to 299, 10 000 images in seconds on a GPU. Numbers from it compare only with numbers from the
same weights file; its SHA-256 is recorded with every statistic (:meth:`metadata`).

The weights ship in the package (``fewstep/metrics/weights/fmnist-classifier.safetensors``) with a JSON
record beside them (SHA-256, test accuracy, feature dimension, training settings). Loading checks the
file's SHA-256 against the record and refuses a mismatch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.files import sha256_of
from fewstep.metrics.extractors import FeatureExtractor
from fewstep.registry import extractors

WEIGHTS = Path(__file__).parent / "weights" / "fmnist-classifier.safetensors"
INPUT_SIZE = 32


class ClassifierWeightsError(RuntimeError):
    """A missing classifier weights file, or one whose SHA-256 differs from its record."""


class FashionClassifier(nn.Module):
    """Three conv blocks (3×3 conv, ReLU, 2×2 max-pool: 32→16→8→4 px) and two linear layers.

    Args:
        widths: channels of the three conv blocks.
        feature_dim: width of the penultimate (feature) layer.
        num_classes: number of logits.

    Input: (N, 1, 32, 32) float32 in [−1, 1] (``u8/127.5 − 1``, the toolkit's pixel range).
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), feature_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        layers, c_in = [], 1
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * (INPUT_SIZE // 8) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.widths, self.feature_dim = tuple(widths), feature_dim

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) in [−1, 1] → (N, feature_dim) penultimate ReLU activations."""
        return torch.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) in [−1, 1] → (N, num_classes) logits."""
        return self.head(self.dropout(self.features(x)))


def record_path(weights: str | os.PathLike) -> Path:
    """The JSON record beside a weights file (``x.safetensors`` → ``x.json``)."""
    return Path(weights).with_suffix(".json")


def load_classifier(path: str | os.PathLike | None = None, device: torch.device | str = "cpu"
                    ) -> tuple[FashionClassifier, dict]:
    """The classifier in eval mode and its record, after checking the file's SHA-256 against the record.

    Raises:
        ClassifierWeightsError: the weights or the record are missing, or the hash differs.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    record_file = record_path(path)
    if not path.is_file() or not record_file.is_file():
        missing = path if not path.is_file() else record_file
        raise ClassifierWeightsError(f"fmnist-classifier: {missing} is missing; the weights ship with fewstep "
                                     "(reinstall it) or are made by scripts/train-fmnist-classifier.py")
    record = json.loads(record_file.read_text())
    sha = sha256_of(path)
    if sha != record.get("sha256"):
        raise ClassifierWeightsError(f"fmnist-classifier: {path} has SHA-256 {sha}, but {record_file} records "
                                     f"{record.get('sha256')}; the file was changed or truncated. Reinstall "
                                     "fewstep or rerun scripts/train-fmnist-classifier.py")
    arch = record["architecture"]
    net = FashionClassifier(tuple(arch["widths"]), arch["feature_dim"], arch["num_classes"])
    net.load_state_dict(load_file(path))
    return net.to(device).eval(), record


@extractors.register("fmnist-classifier", summary="small Fashion-MNIST CNN (shipped weights, 128-d penultimate "
                     "features): fast FD for 1×32×32 Fashion-MNIST images")
class FashionClassifierExtractor(FeatureExtractor):
    """Penultimate features of the shipped Fashion-MNIST classifier.

    Args:
        path: weights file (default: the shipped one); its JSON record must sit beside it.
        device: where to run.
    """

    name = "fmnist-classifier"

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.net, self.record = load_classifier(path, self.device)
        self.sha256 = self.record["sha256"]
        self.feature_dim = self.net.feature_dim

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 1, 32, 32) → float32 in [−1, 1] on the extractor's device."""
        if images.shape[1:] != (1, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"fmnist-classifier takes 1×{INPUT_SIZE}×{INPUT_SIZE} grey images (Fashion-MNIST "
                             f"padded to 32), got {tuple(images.shape[1:])}; use the inception extractor")
        return images.to(self.device, torch.float32) / 127.5 - 1

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1, 32, 32) in [−1, 1] → (N, 128) float32, outside any autocast."""
        with torch.autocast(self.device.type, enabled=False):
            return self.net.features(x.float())

    has_probabilities = True

    def embed_with_probabilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, 1, 32, 32) in [−1, 1] → (N, 128) features and (N, 10) softmax class probabilities (the
        classifier's own head on the same features; dropout is off in eval mode)."""
        with torch.autocast(self.device.type, enabled=False):
            features = self.net.features(x.float())
            return features, torch.softmax(self.net.head(features), dim=1)

    def metadata(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.sha256, "resize": "none",
                "input_size": INPUT_SIZE, "feature_dim": self.feature_dim}
