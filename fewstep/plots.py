"""Scatter plots of 2-D point sets as PNG files, rasterised with torch (no plotting dependency).

Each set is drawn in its own square panel, side by side, on a light-grey background with faint axes
through the origin; every panel shares one extent so the panels compare directly. A pixel hit by k
points is blended towards the set's colour with weight 1 − (1 − α)^k, so dense regions saturate and
single points stay visible.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from fewstep.images import write_png

BACKGROUND, AXES, GAP = 240, 215, 255
COLORS = ((40, 40, 40), (31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
ALPHA = 0.4


def default_extent(points: Tensor, margin: float = 1.1) -> tuple[float, float]:
    """A square extent (lo, hi) = ±margin·max|coordinate| of ``points`` (N, 2), centred on 0."""
    half = float(points.detach().abs().max()) * margin if points.numel() else 1.0
    return (-half, half) if half > 0 else (-1.0, 1.0)


def pixel_coords(points: Tensor, extent: tuple[float, float], size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Map (N, 2) points (x right, y up) to (row, col) pixels of a size×size panel.

    ``col = ⌊(x − lo)/(hi − lo)·size⌋`` and ``row = ⌊(hi − y)/(hi − lo)·size⌋``. Returns int64 rows,
    cols and a bool mask of the points that fall inside the panel (others are not drawn).
    """
    lo, hi = extent
    if not hi > lo:
        raise ValueError(f"extent must be (lo, hi) with hi > lo, got {extent}")
    p = points.detach().to("cpu", torch.float64)
    col = torch.floor((p[:, 0] - lo) / (hi - lo) * size)
    row = torch.floor((hi - p[:, 1]) / (hi - lo) * size)
    inside = (col >= 0) & (col < size) & (row >= 0) & (row < size) & torch.isfinite(p).all(dim=1)
    return row.nan_to_num(0).long(), col.nan_to_num(0).long(), inside


def scatter_panel(points: Tensor, color: Sequence[int], extent: tuple[float, float], size: int) -> Tensor:
    """One (3, size, size) uint8 panel of ``points`` (N, 2)."""
    row, col, inside = pixel_coords(points, extent, size)
    counts = torch.bincount(row[inside] * size + col[inside], minlength=size * size).reshape(size, size)
    panel = torch.full((3, size, size), float(BACKGROUND), dtype=torch.float64)
    lo, hi = extent
    if lo < 0 < hi:                                          # faint axes through the origin
        r0, c0, _ = pixel_coords(torch.zeros(1, 2), extent, size)
        panel[:, int(r0), :] = AXES
        panel[:, :, int(c0)] = AXES
    weight = 1 - (1 - ALPHA) ** counts.double()             # (size, size) in [0, 1)
    target = torch.tensor(color, dtype=torch.float64).view(3, 1, 1)
    panel = panel + (target - panel) * weight
    return panel.round().clamp(0, 255).to(torch.uint8)


def scatter_image(point_sets: Sequence[Tensor], colors: Sequence[Sequence[int]] | None = None,
                  size: int = 256, extent: tuple[float, float] | None = None, pad: int = 4) -> Tensor:
    """Panels of each (N_i, 2) set side by side: a (3, size + 2·pad, n·size + (n + 1)·pad) uint8 image.

    Args:
        point_sets: 2-D point sets, one panel each, left to right.
        colors: one RGB triple per set (default: near-black, blue, red, green, purple, cycling).
        size: panel side in pixels.
        extent: (lo, hi) shared by both axes of every panel (default: from the first set, see
            :func:`default_extent`).
        pad: white pixels around and between panels. Panel k's top-left pixel is at
            (row pad, col pad + k·(size + pad)).
    """
    if not point_sets:
        raise ValueError("scatter_image needs at least one point set")
    for i, p in enumerate(point_sets):
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"point set {i} must be (N, 2), got {tuple(p.shape)}")
    extent = extent if extent is not None else default_extent(point_sets[0])
    colors = colors if colors is not None else [COLORS[i % len(COLORS)] for i in range(len(point_sets))]
    if len(colors) != len(point_sets):
        raise ValueError(f"got {len(colors)} colors for {len(point_sets)} point sets")
    n = len(point_sets)
    image = torch.full((3, size + 2 * pad, n * size + (n + 1) * pad), GAP, dtype=torch.uint8)
    for k, (points, color) in enumerate(zip(point_sets, colors)):
        left = pad + k * (size + pad)
        image[:, pad:pad + size, left:left + size] = scatter_panel(points, color, extent, size)
    return image


def scatter_png(path: str | os.PathLike, point_sets: Sequence[Tensor],
                colors: Sequence[Sequence[int]] | None = None, size: int = 256,
                extent: tuple[float, float] | None = None) -> Path:
    """Write :func:`scatter_image` of ``point_sets`` (each (N, 2)) to ``path`` as an RGB PNG."""
    return write_png(path, scatter_image(point_sets, colors=colors, size=size, extent=extent))
