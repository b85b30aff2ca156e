"""Reading the PNGs fewstep writes with matplotlib (RGBA, filtered scanlines) back in tests, through Pillow."""
from __future__ import annotations

import numpy as np


def read_rgb(path) -> np.ndarray:
    """(H, W, 3) uint8 of any PNG."""
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def find_block(png: np.ndarray, block: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners (row, col) where ``block`` (h, w, 3) appears exactly in ``png`` (H, W, 3)."""
    h, w, _ = block.shape
    rows, cols = np.nonzero((png[: png.shape[0] - h + 1, : png.shape[1] - w + 1] == block[0, 0]).all(-1))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if (png[r:r + h, c:c + w] == block).all()]
