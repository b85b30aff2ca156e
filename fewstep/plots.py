"""Figures with matplotlib (the ``plots`` extra: ``pip install 'fewstep[plots]'``).

* :func:`line_chart`: lines over x (metric vs NFE, a loss curve against kimg, two runs compared), one
  panel or several side by side (:func:`panel_chart`, one per sweep member).
* :func:`scatter_png`: 2-D point sets side by side on one shared extent (toy data against held-out data).
* :func:`write_grid`: a sample grid with each block labelled (``1 step``, ``4 steps``); the images keep
  their exact pixels (placed with ``figimage``, never resampled), the labels sit in a margin. Without
  matplotlib the grid is written unlabelled (:func:`fewstep.images.write_png`) and a warning says how
  to get labels.

matplotlib is used through its object-oriented API on an Agg canvas (no pyplot, no global backend, no
display needed), and every file is written under a temporary name and renamed, so a reader never
sees half a PNG. Without matplotlib the plotting functions raise :class:`PlotsUnavailable`, whose
message names the extra to install.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from fewstep.files import write_atomic

log = logging.getLogger(__name__)

PLOTS_EXTRA = "pip install 'fewstep[plots]'"
DPI = 100


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def figure(width_px: float, height_px: float) -> Any:
    """An Agg-backed matplotlib Figure of the given size in pixels."""
    try:
        import matplotlib  # noqa: F401  (the package itself: its submodules may be cached without it)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotsUnavailable(f"plots need matplotlib, which is not installed ({exc}); install it with "
                               f"{PLOTS_EXTRA}") from exc
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at its own size and DPI, atomically."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))

# ---------------------------------------------------------------------------------------------------
# Line charts
# ---------------------------------------------------------------------------------------------------
@dataclass
class Series:
    """One line: ``label`` and points (x_i, y_i); non-finite (or, on a log axis, non-positive) points are
    left out and break the line."""

    label: str
    x: Sequence[float]
    y: Sequence[float]

def _auto_log(series: Sequence[Series]) -> bool:
    """Log y when every finite y is positive and they span more than 20×."""
    ys = [float(v) for s in series for v in s.y if math.isfinite(float(v))]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20

def _draw_lines(ax: Any, series: Sequence[Series], *, log_x: bool, log_y: bool | None,
                x_ticks: Sequence[float] | None) -> None:
    log_y = _auto_log(series) if log_y is None else log_y
    for s in series:
        x = [float(v) for v in s.x]
        y = [float(v) if math.isfinite(float(v)) and (not log_y or float(v) > 0) else math.nan for v in s.y]
        ax.plot(x, y, marker="o" if len(x) <= 12 else None, markersize=4, linewidth=1.6, label=s.label)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if x_ticks is not None:
        ax.set_xticks(list(x_ticks), [f"{v:g}" for v in x_ticks])
        ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)

def line_chart(path: str | os.PathLike, series: Sequence[Series], *, title: str = "", xlabel: str = "",
               ylabel: str = "", log_x: bool = False, log_y: bool | None = None,
               x_ticks: Sequence[float] | None = None, size: tuple[int, int] = (720, 450)) -> Path:
    """Write a chart of ``series`` (one line each, with a legend when there are several) to ``path``.

    Args:
        log_x, log_y: logarithmic axes; ``log_y=None`` picks log when all y > 0 span more than 20×.
        x_ticks: tick positions on x, labelled as given (e.g. the NFEs evaluated).
        size: (width, height) in pixels.
    """
    fig = figure(*size)
    ax = fig.add_subplot()
    _draw_lines(ax, series, log_x=log_x, log_y=log_y, x_ticks=x_ticks)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)

@dataclass
class Panel:
    """One panel of :func:`panel_chart`: its title, y label and lines."""

    title: str
    ylabel: str
    series: Sequence[Series]

def panel_chart(path: str | os.PathLike, panels: Sequence[Panel], *, xlabel: str = "", title: str = "",
                ncols: int = 3, panel_size: tuple[int, int] = (400, 280)) -> Path:
    """Panels side by side (``ncols`` per row), each on its own y scale; e.g. one loss curve per member."""
    if not panels:
        raise ValueError("panel_chart needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig = figure(panel_size[0] * ncols, panel_size[1] * nrows + (30 if title else 0))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        _draw_lines(ax, panel.series, log_x=False, log_y=None, x_ticks=None)
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        if len(panel.series) > 1:
            ax.legend(frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)

# ---------------------------------------------------------------------------------------------------
# Scatter plots
# ---------------------------------------------------------------------------------------------------
def default_extent(points: Tensor, margin: float = 1.1) -> tuple[float, float]:
    """A square extent (lo, hi) = ±margin·max|coordinate| of ``points`` (N, 2), centred on 0."""
    finite = points[torch.isfinite(points).all(dim=1)] if points.numel() else points
    half = float(finite.detach().abs().max()) * margin if finite.numel() else 1.0
    return (-half, half) if half > 0 else (-1.0, 1.0)

def scatter_png(path: str | os.PathLike, point_sets: Sequence[Tensor], titles: Sequence[str] | None = None,
                extent: tuple[float, float] | None = None, title: str = "", panel_px: int = 300) -> Path:
    """Panels of each (N_i, 2) point set side by side, on one square extent, titled.

    Args:
        point_sets: 2-D point sets, one panel each, left to right.
        titles: one title per panel (e.g. ``held-out data``, ``1 step``, ``4 steps``).
        extent: (lo, hi) of both axes of every panel (default: from the first set, see :func:`default_extent`).
    """
    if not point_sets:
        raise ValueError("scatter_png needs at least one point set")
    for i, p in enumerate(point_sets):
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"point set {i} must be (N, 2), got {tuple(p.shape)}")
    titles = list(titles) if titles is not None else [f"set {i}" for i in range(len(point_sets))]
    if len(titles) != len(point_sets):
        raise ValueError(f"got {len(titles)} titles for {len(point_sets)} point sets")
    lo, hi = extent if extent is not None else default_extent(point_sets[0])
    n = len(point_sets)
    fig = figure(panel_px * n, panel_px + (40 if title else 10))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for k, (ax, points, name) in enumerate(zip(axes, point_sets, titles)):
        p = points.detach().float().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.35, linewidths=0, color="0.15" if k == 0 else f"C{k - 1}",
                   rasterized=True)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", linewidth=0.8, zorder=0)
        ax.axvline(0, color="0.85", linewidth=0.8, zorder=0)
        ax.set_title(name)
        ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)

# ---------------------------------------------------------------------------------------------------
# Sample grids with labelled blocks
# ---------------------------------------------------------------------------------------------------
@dataclass
class GridLayout:
    """Where :func:`labelled_grid_png` puts the grid: its top-left pixel in the PNG (``left``, ``top``)."""

    left: int
    top: int

def step_label(nfe: int) -> str:
    return f"{nfe} step" + ("s" if nfe != 1 else "")

def labelled_grid_png(path: str | os.PathLike, blocks: list[Tensor], labels: Sequence[str], title: str = "",
                      ncol: int | None = None) -> GridLayout:
    """Write :func:`fewstep.images.make_grid` of ``blocks`` (each (N, C, H, W) uint8) with ``labels[k]``
    beside block k, and ``title`` above; the grid's pixels are copied exactly (RGB, grey repeated).

    Returns where the grid's top-left pixel is in the PNG.
    """
    from fewstep.images import make_grid

    if len(labels) != len(blocks):
        raise ValueError(f"got {len(labels)} labels for {len(blocks)} grid blocks")
    grid = make_grid(blocks, ncol=ncol)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    _, height, width = grid.shape
    fontsize = 11
    char_px = 0.62 * fontsize * DPI / 72   # DejaVu Sans' mean advance, points → pixels
    left = 16 + int(char_px * max(len(label) for label in labels))
    top = 30 if title else 4
    W, H = max(left + width + 4, int(char_px * len(title)) + 16), top + height + 4
    fig = figure(W, H)
    fig.figimage(grid.permute(1, 2, 0).contiguous().numpy(), xo=left, yo=4, origin="upper")
    block_top, pad = top, 2
    cols = ncol or max(1, int(round(blocks[0].shape[0] ** 0.5)))
    for block, label in zip(blocks, labels):
        rows = -(-block.shape[0] // cols)
        block_h = rows * (block.shape[2] + pad) + pad
        centre = block_top + block_h / 2
        fig.text((left - 8) / W, 1 - centre / H, label, ha="right", va="center", fontsize=fontsize)
        block_top += block_h + 2 * pad   # the grey gap between blocks
    if title:
        fig.text(0.5, 1 - 15 / H, title, ha="center", va="center", fontsize=fontsize)
    save_figure(fig, path)
    return GridLayout(left=left, top=top)

_warned_unlabelled = False

def write_grid(path: str | os.PathLike, blocks: list[Tensor], labels: Sequence[str], title: str = "") -> Path:
    """A sample grid labelled by :func:`labelled_grid_png`; without matplotlib the bare grid
    (:func:`fewstep.images.write_png`) and, once per process, a warning naming the extra."""
    global _warned_unlabelled
    try:
        labelled_grid_png(path, blocks, labels, title)
    except PlotsUnavailable as exc:
        from fewstep.images import make_grid, write_png

        if not _warned_unlabelled:
            log.warning(f"sample grids are written without labels: {exc}")
            _warned_unlabelled = True
        write_png(path, make_grid(blocks))
    return Path(path)
