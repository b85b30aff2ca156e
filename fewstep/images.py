"""Image grids as PNG files, with no imaging dependency (zlib + struct)."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from fewstep.files import write_atomic


ROUNDINGS = ("round", "truncate", "floor", "half-up")


def to_uint8(images: Tensor, rounding: Literal["round", "truncate", "floor", "half-up"] = "round") -> Tensor:
    """(N, C, H, W) floats in [−1, 1] → uint8 in [0, 255], with the arithmetic of one reference code each
    (they differ only where 127.5·(x + 1) is within a rounding step of an integer or half-integer):

    * ``round``: ``round((x + 1) · 127.5)``, clamped (pixel datasets stored as ``u8 / 127.5 − 1`` round-trip
      exactly; fewstep's default, as a PNG writer would).
    * ``truncate``: ``(x · 0.5 + 0.5)`` clamped to [0, 1], ×255, cast by truncation — the official TVM and
      EDM2 code on VAE decoder outputs (``StabilityVAEEncoder.decode``; ``docs/design/tvm.md`` §4).
    * ``floor``: ``((x + 1) · 127.5)`` clamped to [0, 255], cast by truncation — ADM's sampling scripts
      (guided-diffusion ``scripts/image_sample.py``), whose ``.npz`` files ADM's evaluator reads.
    * ``half-up``: ``(x · 127.5 + 128)`` clamped to [0, 255], cast by truncation (rounds halves up) —
      StyleGAN3's metrics (``metric_utils.compute_feature_stats_for_generator``), EDM2's pixel encoder and
      DiT's ``sample_ddp.py`` (on VAE outputs).
    """
    images = images.detach().float().cpu()
    if rounding == "round":
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if rounding == "truncate":
        return (images * 0.5 + 0.5).clamp(0, 1).mul(255).to(torch.uint8)
    if rounding == "floor":
        return ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if rounding == "half-up":
        return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def make_grid(blocks: list[Tensor], ncol: int | None = None, pad: int = 2) -> Tensor:
    """Tile image blocks into one (C, H', W') uint8 image.

    Args:
        blocks: list of (N, C, H, W) uint8 tensors, all the same C, H, W; each block starts a new row
            group, separated by a wider gap (e.g. one block per NFE, same seeds).
        ncol: images per row (default ⌈√N⌉ of the first block).
        pad: pixels between images (white).
    """
    n, c, h, w = blocks[0].shape
    ncol = ncol or max(1, int(round(n ** 0.5)))
    rows = []
    for block in blocks:
        if block.shape[1:] != (c, h, w):
            raise ValueError(f"grid blocks differ in shape: {tuple(block.shape[1:])} vs {(c, h, w)}")
        nrow = -(-block.shape[0] // ncol)
        canvas = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
        for i, img in enumerate(block):
            r, k = divmod(i, ncol)
            canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
        rows.append(canvas)
    gap = torch.full((c, 2 * pad, rows[0].shape[2]), 128, dtype=torch.uint8)
    out = [rows[0]]
    for row in rows[1:]:
        out += [gap, row]
    return torch.cat(out, dim=1)


def write_png(path: str | os.PathLike, image: Tensor) -> Path:
    """Write a (C, H, W) uint8 image (C = 1 grey, 3 RGB) as PNG, atomically."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"write_png needs (1|3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
    c, h, w = image.shape
    rows = image.permute(1, 2, 0).contiguous().numpy().reshape(h, w * c)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    return write_atomic(path, png)


def read_png(path: str | os.PathLike) -> Tensor:
    """Read back a PNG written by :func:`write_png` (8-bit grey or RGB, no interlace) as (C, H, W) uint8."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color = header[0], header[1], header[2], header[3]
    if depth != 8 or color not in (0, 2):
        raise ValueError(f"{path}: only 8-bit grey/RGB PNGs are supported")
    c = 1 if color == 0 else 3
    raw = zlib.decompress(idat)
    stride = w * c + 1
    rows = [raw[r * stride + 1:(r + 1) * stride] for r in range(h)]
    if any(raw[r * stride] != 0 for r in range(h)):
        raise ValueError(f"{path}: filtered scanlines are not supported")
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(h, w, c).permute(2, 0, 1)
