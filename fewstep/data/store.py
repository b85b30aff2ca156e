"""The on-disk layout of prepared latents (a Hugging Face ``datasets`` dataset saved to disk, plus metadata):
reading it, and writing it shard by shard.

A prepared directory (written by :mod:`fewstep.data.prepare`) holds::

    data-00000-of-00128.arrow …   Arrow IPC streams, one per shard: columns mean, std (Array3D (C, h, w)),
                                  label (ClassLabel, or int64 when unconditional), index (source item)
    state.json, dataset_info.json the files ``datasets.load_from_disk(DIR)`` reads
    latents.json                  the latent format (VAE, resolution, shapes, per-channel statistics)
    .prepare/                     settings and one record per finished shard (resuming, merging)

Reading goes through pyarrow only (memory-mapped, zero-copy): the ``datasets`` package is not needed to
train, and the columns are shared by every process on a machine through the page cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.data.base import DataError, DataNotFoundError
from fewstep.files import write_json

META_FILE = "latents.json"
FORMAT = "fewstep-latents"
VERSION = 1
RECORD_ROWS = 1024                   # rows per Arrow record batch
SETTINGS_KEYS = ("data", "split", "resolution", "vae", "shard_size", "dtype", "seed", "num_items", "latent_shape")


def shard_file(k: int, num_shards: int) -> str:
    """File name of shard ``k`` (the names ``Dataset.save_to_disk`` uses)."""
    return f"data-{k:05d}-of-{num_shards:05d}.arrow"



def read_meta(root: str | os.PathLike) -> dict:
    """``root/latents.json``; a missing or unfinished directory is a :class:`DataNotFoundError`."""
    root = Path(root).expanduser()
    path = root / META_FILE
    if not path.is_file():
        if (root / ".prepare").is_dir():
            raise DataNotFoundError(f"{root} is an unfinished `fewstep prepare` output (no {META_FILE} yet); "
                                    f"rerun the same prepare command to finish it")
        raise DataNotFoundError(f"{root} holds no prepared latents ({META_FILE} is missing); create them with "
                                f"`fewstep prepare --data imagefolder:PATH --resolution 256 --out {root}`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable: {exc}") from exc
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise DataError(f"{path} is not a fewstep latents file of version ≤ {VERSION} "
                        f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    return meta


class ArrowLatents:
    """Memory-mapped posterior columns of a prepared directory.

    Args:
        root: the prepared directory.
        meta: its ``latents.json``.

    Attributes:
        labels: (N,) int64 labels, in memory.
        shape: (C, h, w) of the stored mean and std.
    """

    def __init__(self, root: Path, meta: dict):
        try:
            import pyarrow as pa
        except ImportError as exc:
            raise DataError(f"reading prepared latents needs pyarrow ({exc}); install it with "
                            f"pip install 'fewstep[hf]'") from exc
        state = json.loads((root / "state.json").read_text())
        self.shape = tuple(int(v) for v in meta["latent_shape"])
        self._mean: list[np.ndarray] = []
        self._std: list[np.ndarray] = []
        labels, starts, n = [], [0], 0
        for item in state["_data_files"]:
            path = root / item["filename"]
            if not path.is_file():
                raise DataNotFoundError(f"{root}: data file {item['filename']} listed in state.json is missing")
            for batch in pa.ipc.open_stream(pa.memory_map(str(path))):
                rows = batch.num_rows
                self._mean.append(_array(batch.column("mean"), rows, self.shape, path))
                self._std.append(_array(batch.column("std"), rows, self.shape, path))
                labels.append(batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
                n += rows
                starts.append(n)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.labels = torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: Tensor) -> Tensor:
        """Rows ``indices`` (B,) as one (B, 2C, h, w) float32 tensor: posterior mean ‖ std."""
        idx = indices.numpy().astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)})")
        chunk = np.searchsorted(self.starts, idx, side="right") - 1
        c = self.shape[0]
        out = torch.empty((len(idx), 2 * c, *self.shape[1:]), dtype=torch.float32)
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for sel in np.split(order, bounds):
            if not sel.size:
                continue
            k = int(chunk[sel[0]])
            rows = idx[sel] - self.starts[k]
            where = torch.from_numpy(sel)
            out[where, :c] = torch.from_numpy(self._mean[k][rows]).float()
            out[where, c:] = torch.from_numpy(self._std[k][rows]).float()
        return out


class TensorLatents:
    """In-memory posterior columns with :class:`ArrowLatents`' interface (``LatentDataset.from_tensors``)."""

    def __init__(self, mean: Tensor, std: Tensor, labels: Tensor):
        self.stored = torch.cat([mean, std], 1).float().contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.shape = tuple(mean.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: Tensor) -> Tensor:
        return self.stored[indices]


def _array(column: Any, rows: int, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """An Array3D column (extension or plain nested lists) as a zero-copy (rows, *shape) numpy view."""
    storage = getattr(column, "storage", column)
    values = storage
    for _ in shape:
        values = values.flatten()
    if values.null_count or len(values) != rows * int(np.prod(shape)):
        raise DataError(f"{path}: a column holds {len(values)} values for {rows} rows of shape {shape}")
    return values.to_numpy(zero_copy_only=True).reshape(rows, *shape)


# ---------------------------------------------------------------------------------------------------
# Writing: settings, shards, merge (``datasets`` is imported here, lazily)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """What a prepared directory is made from; a resumed run must match (except the run-time knobs)."""

    data: str
    split: str
    resolution: int
    vae: str
    shard_size: int
    dtype: str
    seed: int
    num_items: int
    latent_shape: list[int]
    num_classes: int
    class_names: list[str] | None = None
    vae_config: dict = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_items / self.shard_size)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_items))


def stats_seed(seed: int, item: int) -> int:
    """Seed of the ε that item ``item`` draws for the per-channel statistics (one generator per item, so
    the statistics do not depend on batch size, shards or ranks)."""
    return (seed * 1_000_003 + item) % (1 << 63)


def _features(s: Settings) -> Any:
    import datasets

    array = lambda: datasets.Array3D(tuple(s.latent_shape), s.dtype)   # noqa: E731
    label = (datasets.ClassLabel(names=s.class_names) if s.class_names else datasets.ClassLabel(num_classes=s.num_classes)
             ) if s.num_classes else datasets.Value("int64")
    return datasets.Features({"mean": array(), "std": array(), "label": label, "index": datasets.Value("int64")})


def record_path(out: Path, k: int) -> Path:
    return out / ".prepare" / f"shard-{k:05d}.json"


def shard_done(out: Path, s: Settings, k: int) -> bool:
    return record_path(out, k).is_file() and (out / shard_file(k, s.num_shards)).is_file()


class ShardWriter:
    """Writes shard ``k`` of ``out``: rows of (mean, std, label) to a temporary Arrow file, with the sums
    of z = mean + std·ε per channel (ε of item i from a generator seeded with :func:`stats_seed`, on the data's
    device); :meth:`finish` renames the file into place and writes the shard's record."""

    def __init__(self, out: Path, s: Settings, k: int):
        from datasets.arrow_writer import ArrowWriter

        self.out, self.s, self.k = out, s, k
        self.final = out / shard_file(k, s.num_shards)
        self.tmp = out / f".{self.final.name}.tmp"
        self.writer = ArrowWriter(features=_features(s), path=str(self.tmp))
        self.generator: torch.Generator | None = None
        c = s.latent_shape[0]
        self.total, self.total_sq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        self.buffer: dict[str, list] = {"mean": [], "std": [], "label": [], "index": []}
        self.next_index = s.shard_range(k).start

    def add(self, mean: Tensor, std: Tensor, labels: Tensor) -> None:
        """Rows (B, C, h, w) of posterior mean and std (any device) and their labels (B,)."""
        if tuple(mean.shape[1:]) != tuple(self.s.latent_shape) or mean.shape != std.shape:
            raise DataError(f"latents of shape {tuple(mean.shape[1:])} (std {tuple(std.shape[1:])}), "
                            f"expected {tuple(self.s.latent_shape)}")
        dtype = getattr(torch, self.s.dtype)
        mean, std = mean.to(dtype), std.to(dtype)   # the statistics describe the stored values
        if self.generator is None or self.generator.device != mean.device:
            self.generator = torch.Generator(mean.device)
        eps = torch.stack([torch.randn(mean.shape[1:], device=mean.device, generator=self.generator.manual_seed(
            stats_seed(self.s.seed, self.next_index + i))) for i in range(len(mean))])
        z = mean.float() + std.float() * eps
        self.total += z.double().sum(dim=(0, 2, 3)).cpu()
        self.total_sq += z.double().square().sum(dim=(0, 2, 3)).cpu()
        n = len(labels)
        self.buffer["mean"].append(mean.cpu().numpy())
        self.buffer["std"].append(std.cpu().numpy())
        self.buffer["label"].append(torch.as_tensor(labels).cpu().numpy().astype(np.int64))
        self.buffer["index"].append(np.arange(self.next_index, self.next_index + n, dtype=np.int64))
        self.next_index += n
        if sum(len(v) for v in self.buffer["label"]) >= RECORD_ROWS:
            _flush(self.writer, self.buffer)

    def finish(self) -> dict:
        _flush(self.writer, self.buffer)
        try:
            count, _ = self.writer.finalize()
        finally:
            self.writer.close()
        want = len(self.s.shard_range(self.k))
        if count != want:
            raise DataError(f"shard {self.k}: wrote {count} items, expected {want}")
        os.replace(self.tmp, self.final)
        record = {"shard": self.k, "file": self.final.name, "items": count, "sum": self.total.tolist(),
                  "sum_sq": self.total_sq.tolist(), "count": count * self.s.latent_shape[1] * self.s.latent_shape[2]}
        write_json(record_path(self.out, self.k), record)
        return record

    def close(self) -> None:
        """Abandon an unfinished shard (its temporary file is overwritten on the next try)."""
        self.writer.close()


def _flush(writer: Any, buffer: dict[str, list]) -> None:
    if buffer["label"]:
        writer.write_batch({k: np.concatenate(v) for k, v in buffer.items()})
        for v in buffer.values():
            v.clear()


def merge_shards(out: Path) -> dict:
    """Main process, after every rank finished: check all shards, write the ``datasets`` files and
    ``latents.json`` with the per-channel statistics (population mean and std over all latent cells)."""
    import datasets

    s = Settings(**read_json(out / ".prepare" / "settings.json"))
    missing = [k for k in range(s.num_shards) if not shard_done(out, s, k)]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {s.num_shards} shards are not encoded yet (first: "
                        f"{missing[:5]}); rerun the same prepare command to finish them")
    records = [read_json(record_path(out, k)) for k in range(s.num_shards)]
    n = sum(r["count"] for r in records)
    total = np.sum([r["sum"] for r in records], axis=0, dtype=np.float64)
    total_sq = np.sum([r["sum_sq"] for r in records], axis=0, dtype=np.float64)
    raw_mean = total / n
    raw_std = np.sqrt(np.maximum(total_sq / n - raw_mean ** 2, 0.0))
    state = {"_data_files": [{"filename": shard_file(k, s.num_shards)} for k in range(s.num_shards)],
             "_fingerprint": hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:16],
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": s.split}
    write_json(out / "state.json", state)
    datasets.DatasetInfo(description=f"VAE posterior (mean, std) of {s.data} at {s.resolution} px, written by "
                         f"`fewstep prepare`", features=_features(s)).write_to_directory(str(out))
    from fewstep import __version__

    meta = {"format": FORMAT, "version": VERSION, "source": s.data, "split": s.split, "resolution": s.resolution,
            "vae": s.vae, "vae_config": s.vae_config, "latent_shape": s.latent_shape, "dtype": s.dtype,
            "num_items": s.num_items, "num_classes": s.num_classes, "class_names": s.class_names,
            "crop": "adm-center", "pixels": "u8 / 127.5 - 1", "raw_mean": raw_mean.tolist(),
            "raw_std": raw_std.tolist(), "final_std": 1.0,
            "stats": {"seed": s.seed, "cells_per_channel": n, "std": "population"},
            "shards": s.num_shards, "shard_size": s.shard_size, "fewstep_version": __version__}
    write_json(out / META_FILE, meta)
    return meta


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def check_settings(out: Path, s: Settings, write: bool) -> None:
    """Record ``s`` in a new directory, or refuse to continue one made with other settings."""
    path = out / ".prepare" / "settings.json"
    if path.is_file():
        old = read_json(path)
        diff = [f"{k}: {old.get(k)!r} → {getattr(s, k)!r}" for k in SETTINGS_KEYS if old.get(k) != getattr(s, k)]
        if diff:
            raise DataError(f"{out} holds a prepare run with other settings ({'; '.join(diff)}); use another "
                            f"--out, or the same settings to resume it")
    elif write:
        write_json(path, asdict(s))
    else:
        raise DataError(f"{out}: the main process has not recorded the settings")
