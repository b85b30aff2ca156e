"""Scatter plots and line charts as PNG files, rasterised with torch (no plotting dependency).

Scatter plots: each set is drawn in its own square panel, side by side, on a light-grey background
with faint axes through the origin; every panel shares one extent so the panels compare directly. A
pixel hit by k points is blended towards the set's colour with weight 1 − (1 − α)^k, so dense regions
saturate and single points stay visible.

Line charts (:func:`line_chart`, used by sweep reports): one panel with 1-2-5 ticks on linear or log
axes, 2-px lines with square markers, and a legend; text is drawn with a built-in 5×7 bitmap font.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------------
# Text: a 5×7 bitmap font (upper case, digits, common punctuation; lower case is drawn upper case)
# ---------------------------------------------------------------------------------------------------
# Each glyph: its character, then 7 rows as base-32 digits, bit 4 the leftmost of 5 pixels.
_FONT_TABLE = ("0EHJLPHE14C4444E2EH1248V3V2421HE426AIV225VGU11HE668GUHHE7V1248888EHHEHHE9EHHF12CAEHHVHHHBUHHUHH"
               "UCEHGGGHEDSIHHHISEVGGUGGVFVGGUGGGGEHGNHHFHHHHVHHHIE44444EJ72222ICKHIKOKIHLGGGGGGVMHRLLHHHNHHPLJHHOE"
               "HHHHHEPUHHUGGGQEHHHLIDRUHHUKIHSFGGE11UTV444444UHHHHHHEVHHHHHA4WHHHLLLAXHHA4AHHYHHA4444ZV1248GV.00000"
               "CC,0000C48-000V000_000000V:0CC0CC0/01248G0(2488842)8422248%OP248J3=00V0V00+044V440'4480000[E88888E]"
               "E22222E<248G842>8421248*04LEL40?EH12404!4444404#AAVAVAA@EH1DLLE")
_FONT = {_FONT_TABLE[i]: [int(c, 32) for c in _FONT_TABLE[i + 1:i + 8]] for i in range(0, len(_FONT_TABLE), 8)}
GLYPH_W, GLYPH_H = 6, 7   # advance (5 pixels + 1 space) and height, before scaling


def text_mask(text: str, scale: int = 1) -> Tensor:
    """(7·scale, 6·len(text)·scale) bool mask of ``text``; unknown characters draw as ``?``."""
    mask = torch.zeros(GLYPH_H, GLYPH_W * max(len(text), 1), dtype=torch.bool)
    for k, ch in enumerate(text.upper()):
        rows = _FONT.get(ch, _FONT["?"]) if ch != " " else [0] * GLYPH_H
        for r, bits in enumerate(rows):
            for c in range(5):
                mask[r, k * GLYPH_W + c] = bool(bits >> (4 - c) & 1)
    return mask.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def draw_text(image: Tensor, text: str, row: int, col: int, color: Sequence[int] = (0, 0, 0), scale: int = 1,
              align: str = "left") -> None:
    """Draw ``text`` into a (3, H, W) uint8 image in place; (row, col) is the top-left corner (top-centre or
    top-right for ``align`` ``center``/``right``). Pixels outside the image are dropped."""
    mask = text_mask(text, scale)
    h, w = mask.shape
    col = col - (w // 2 if align == "center" else w - scale if align == "right" else 0)
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + h, image.shape[1]), min(col + w, image.shape[2])
    if r1 <= r0 or c1 <= c0:
        return
    sub = mask[r0 - row:r1 - row, c0 - col:c1 - col]
    region = image[:, r0:r1, c0:c1]
    region[:, sub] = torch.tensor(color, dtype=torch.uint8).view(3, 1)


# ---------------------------------------------------------------------------------------------------
# Line charts
# ---------------------------------------------------------------------------------------------------
LINE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
INK, GRID = (60, 60, 60), 228


@dataclass
class Series:
    """One line: ``label`` and points (x_i, y_i); non-finite (or, on a log axis, non-positive) points are
    left out and break the line."""

    label: str
    x: Sequence[float]
    y: Sequence[float]


def nice_ticks(lo: float, hi: float, log: bool = False, count: int = 5) -> list[float]:
    """Tick values covering [lo, hi]: 1-2-5 steps (linear), or 1-2-5 × powers of ten (log, lo > 0)."""
    if log:
        e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        mantissas = (1,) if e1 - e0 > 3 else (1, 2, 5)
        return [m * 10.0 ** e for e in range(e0, e1 + 1) for m in mantissas if lo <= m * 10.0 ** e <= hi * (1 + 1e-9)]
    raw = (hi - lo) / max(count - 1, 1) or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 12) for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.1e}".replace("e+0", "e").replace("e+", "e")


def line_chart(series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
               log_x: bool = False, log_y: bool | None = None, x_ticks: Sequence[float] | None = None,
               size: tuple[int, int] = (560, 360), legend: bool = True) -> Tensor:
    """A (3, H, W) uint8 line chart with markers, axes, ticks, labels and a legend on the right.

    Args:
        series: the lines, coloured in order (10 colours, cycling).
        log_x, log_y: logarithmic axes; ``log_y=None`` picks log when all y > 0 span more than 20×.
        x_ticks: tick positions on x (default: 1-2-5 ticks).
        size: (width, height) in pixels.
    """
    width, height = size
    pts = [(float(x), float(y)) for s in series for x, y in zip(s.x, s.y)
           if math.isfinite(float(x)) and math.isfinite(float(y))]
    ys = [y for _, y in pts]
    if log_y is None:
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20
    pts = [(x, y) for x, y in pts if (not log_x or x > 0) and (not log_y or y > 0)]
    xs = [p[0] for p in pts] or ([1.0, 10.0] if log_x else [0.0, 1.0])   # nothing to draw: an empty frame
    ys = [p[1] for p in pts] or ([1.0, 10.0] if log_y else [0.0, 1.0])
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = (min(ys), max(ys)) if log_y else (min(0.0, min(ys)), max(ys))
    if xhi <= xlo:
        xlo, xhi = (xlo / 2, xhi * 2) if log_x else (xlo - 1, xhi + 1)
    if yhi <= ylo:
        ylo, yhi = (ylo / 2, yhi * 2) if log_y else (ylo - 1, yhi + 1)
    yticks = nice_ticks(ylo, yhi, log_y) or [ylo, yhi]
    ylo, yhi = min(ylo, yticks[0]), max(yhi, yticks[-1])
    labels = [s.label for s in series] if legend else []
    left = 10 + GLYPH_W * max(len(_fmt(v)) for v in yticks) + (14 if ylabel else 0)
    right = 24 + GLYPH_W * max((len(s) for s in labels), default=0) if labels else 14
    top, bottom = 28 if title else 12, 36 if xlabel else 22
    pw, ph = width - left - right, height - top - bottom
    img = torch.full((3, height, width), 255, dtype=torch.uint8)

    def to_px(x: float, y: float) -> tuple[int, int]:
        fx0, fx1, fy0, fy1 = fx(xlo), fx(xhi), fy(ylo), fy(yhi)
        px, py = 0.04 * (fx1 - fx0), 0.04 * (fy1 - fy0)   # keep markers off the frame
        c = left + (fx(x) - fx0 + px) / (fx1 - fx0 + 2 * px) * (pw - 1)
        r = top + (1 - (fy(y) - fy0 + py) / (fy1 - fy0 + 2 * py)) * (ph - 1)
        return int(round(r)), int(round(c))

    for v in yticks:
        r, _ = to_px(xlo, v)
        img[:, r, left:left + pw] = GRID
        draw_text(img, _fmt(v), r - 3, left - 4, INK, align="right")
    for v in x_ticks if x_ticks is not None else nice_ticks(xlo, xhi, log_x):
        _, c = to_px(v, ylo)
        img[:, top:top + ph, c] = GRID
        draw_text(img, _fmt(v), top + ph + 5, c, INK, align="center")
    img[:, top, left:left + pw] = img[:, top + ph - 1, left:left + pw] = 150
    img[:, top:top + ph, left] = img[:, top:top + ph, left + pw - 1] = 150
    draw_text(img, title, 8, left + pw // 2, INK, align="center")
    draw_text(img, xlabel, height - 12, left + pw // 2, INK, align="center")
    for k, ch in enumerate(ylabel[: ph // 8]):   # vertical, one character per line
        draw_text(img, ch, top + ph // 2 - 4 * len(ylabel) + 8 * k, 3, INK)
    for i, s in enumerate(series):
        color = torch.tensor(LINE_COLORS[i % len(LINE_COLORS)], dtype=torch.uint8).view(3, 1)
        run: list[tuple[int, int]] = []
        for x, y in list(zip(s.x, s.y)) + [(math.nan, math.nan)]:
            x, y = float(x), float(y)
            ok = math.isfinite(x) and math.isfinite(y) and (not log_x or x > 0) and (not log_y or y > 0)
            if ok:
                run.append(to_px(x, y))
                continue
            _polyline(img, run, color, height, width, markers=len(s.x) <= 12)
            run = []
        if labels:
            r, c = top + 4 + 12 * i, left + pw + 8
            img[:, r + 2:r + 5, c:c + 10] = color.view(3, 1, 1)
            draw_text(img, s.label, r, c + 14, INK)
    return img


def _polyline(img: Tensor, run: list[tuple[int, int]], color: Tensor, height: int, width: int, markers: bool) -> None:
    """Connect pixel points (2 px thick), with 5×5 square markers when ``markers``."""
    for (r0, c0), (r1, c1) in zip(run, run[1:]):
        n = max(abs(r1 - r0), abs(c1 - c0)) + 1
        rr = torch.linspace(r0, r1, n).round().long()
        cc = torch.linspace(c0, c1, n).round().long()
        for dr in (0, 1):
            keep = (rr + dr < height) & (cc < width) & (rr + dr >= 0) & (cc >= 0)
            img[:, rr[keep] + dr, cc[keep]] = color
    for r, c in run if markers or len(run) == 1 else []:
        img[:, max(r - 2, 0):r + 3, max(c - 2, 0):c + 3] = color.view(3, 1, 1)
