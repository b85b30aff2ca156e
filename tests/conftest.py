"""Shared fixtures: small generated Fashion-MNIST-format data, so tests never need the real files."""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))   # tests import their helpers (oracle.py) by name
if not torch.cuda.is_available():   # Triton kernels run on CPU through the interpreter (read at kernel import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def write_fashion_like(directory: Path, n_train: int = 512, n_test: int = 64, seed: int = 0) -> Path:
    """Write IDX files in Fashion-MNIST format: class k is a bright bar whose height grows with k."""
    from fewstep.data import fashion_mnist as fm

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 4:6 + 2 * int(k), 8:20] = 220
        for stem, array, magic in zip(fm.FILES[split], (images, labels), (fm.IMAGES_MAGIC, fm.LABELS_MAGIC)):
            header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (directory / f"{stem}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return directory


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """A directory of small Fashion-MNIST-format files (512 train / 64 test images)."""
    return write_fashion_like(tmp_path_factory.mktemp("fashion"))


@pytest.fixture
def gaussian():
    """The shared closed-form Gaussian oracle problem (tests/oracle.py, docs/design/frontier.md §2): 3 classes
    of 1×4×4 N(μ_y, 0.25·I) and a null Gaussian of its own, float64. Every objective's oracle tests use it."""
    from oracle import standard_problem

    return standard_problem()
