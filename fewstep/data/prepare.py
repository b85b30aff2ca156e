"""``fewstep prepare``: encode an image dataset with a VAE into a prepared-latents directory.

Pipeline (``docs/design/tvm.md`` §3, "dataset prep"): ADM centre crop to ``resolution`` (:func:`~fewstep.data.hf.
center_crop`), pixels ``u8 / 127.5 − 1``, VAE encoder in fp32, posterior mean and std stored per image
with its label, then the per-channel mean and std of sampled latents ``z = mean + std·ε``.

Items are cut into shards of ``shard_size`` consecutive items; shard k is encoded by rank ``k mod world``
(``accelerate launch`` / ``torchrun``) and written as ``data-0000k-of-N.arrow`` plus a record in
``.prepare/``. A shard counts as done once its record exists, so an interrupted run resumes at the first
unfinished shard of each rank and re-encodes nothing that was finished. The main process then merges:
``state.json`` and ``dataset_info.json`` (so ``datasets.load_from_disk(DIR)`` works) and ``latents.json``
(written last: its presence marks a complete directory). The statistics' ε of item i comes from a
generator seeded with (seed, i), so any split over ranks or batches, and any interruption, gives the
same statistics.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from fewstep.config import DataConfig
from fewstep.data.base import DataError, load_dataset
from fewstep.data.store import (META_FILE, RECORD_ROWS, Settings, ShardWriter, check_settings, merge_shards,
                                read_meta, shard_done)
from fewstep.data.vae import encode_posterior, load_vae, vae_factor

log = logging.getLogger(__name__)


def shards_of_rank(num_shards: int, rank: int, world: int) -> list[int]:
    """Shards rank ``rank`` of ``world`` encodes: k ≡ rank (mod world)."""
    return list(range(rank, num_shards, world))


def encode_shard(out: Path, s: Settings, k: int, source: Any, vae: Any, *, batch_size: int, workers: int,
                 on_batch: Callable[[int], None] | None = None) -> dict:
    """Encode shard ``k`` of ``source`` with ``vae`` (on its device) into ``out``; returns its record."""
    device = next(vae.parameters()).device
    loader = DataLoader(Subset(source, s.shard_range(k)), batch_size=batch_size, num_workers=workers,
                        shuffle=False, pin_memory=device.type == "cuda")
    writer = ShardWriter(out, s, k)
    try:
        for x, y in loader:
            mean, std = encode_posterior(vae, x)
            writer.add(mean, std, y)
            if on_batch is not None:
                on_batch(len(y))
        return writer.finish()
    except BaseException:
        writer.close()
        raise


def write_latents(out: str | os.PathLike, mean: Tensor, std: Tensor, labels: Tensor, *, resolution: int,
                  vae: str, num_classes: int, class_names: list[str] | None = None, source: str = "arrays",
                  split: str = "train", shard_size: int = 10_000, dtype: str = "float32", seed: int = 0) -> dict:
    """Write already-computed posteriors (N, C, h, w) and labels (N,) as a prepared directory (latents
    encoded elsewhere, e.g. EDM2/TVM ``.npy`` files of mean ‖ std); returns ``latents.json``."""
    out = Path(out).expanduser()
    if mean.ndim != 4 or mean.shape != std.shape or labels.shape != mean.shape[:1]:
        raise DataError(f"need mean and std (N, C, h, w) and labels (N,), got {tuple(mean.shape)}, "
                        f"{tuple(std.shape)}, {tuple(labels.shape)}")
    s = Settings(data=source, split=split, resolution=resolution, vae=vae, shard_size=shard_size, dtype=dtype,
                 seed=seed, num_items=len(labels), latent_shape=list(mean.shape[1:]), num_classes=num_classes,
                 class_names=class_names)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, s, write=True)
    for k in range(s.num_shards):
        rows = s.shard_range(k)
        writer = ShardWriter(out, s, k)
        for start in range(rows.start, rows.stop, RECORD_ROWS):
            part = slice(start, min(start + RECORD_ROWS, rows.stop))
            writer.add(mean[part], std[part], labels[part])
        writer.finish()
    return merge_shards(out)


def make_settings(data: str, split: str, resolution: int, vae_name: str, source: Any, vae: Any, *,
                  shard_size: int, dtype: str, seed: int, limit: int | None) -> Settings:
    """Check the source and the VAE against each other and describe the run."""
    spec = source.spec
    if spec.kind != "pixels" or spec.channels != 3:
        raise DataError(f"{data}: the VAE encodes RGB images, but the dataset is {spec.kind} with "
                        f"{spec.channels} channel(s)")
    factor = vae_factor(vae)
    if resolution % factor or spec.resolution != resolution:
        raise DataError(f"resolution {resolution} must be a multiple of the VAE's factor {factor} (and the "
                        f"dataset's items {spec.resolution} px)")
    if dtype not in ("float32", "float16"):
        raise DataError(f"dtype must be float32 or float16, got {dtype!r}")
    if shard_size < 1:
        raise DataError(f"shard_size must be ≥ 1, got {shard_size}")
    num_items = len(source) if limit is None else min(int(limit), len(source))
    cfg = vae.config
    names = getattr(source, "class_names", None)
    return Settings(data=data, split=split, resolution=resolution, vae=vae_name, shard_size=shard_size,
                    dtype=dtype, seed=seed, num_items=num_items,
                    latent_shape=[int(cfg.latent_channels), resolution // factor, resolution // factor],
                    num_classes=spec.num_classes, class_names=list(names) if names else None,
                    vae_config={k: _plain(cfg[k]) for k in ("latent_channels", "block_out_channels",
                                                            "scaling_factor") if k in cfg})


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


def encode_rank(out: Path, s: Settings, source: Any, vae: Any, rank: int, world: int, *, batch_size: int = 64,
                workers: int = 0, progress: bool = False, on_batch: Callable[[int], None] | None = None) -> int:
    """Encode the unfinished shards of rank ``rank`` of ``world``; returns the number of items encoded."""
    mine = [k for k in shards_of_rank(s.num_shards, rank, world) if not shard_done(out, s, k)]
    todo = sum(len(s.shard_range(k)) for k in mine)
    device = next(vae.parameters()).device
    log.info(f"rank {rank}: {len(mine)} shards to encode ({todo} images) on {device}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not progress)
    start = time.time()

    def step(n: int) -> None:
        bar.advance(task, n)
        if on_batch is not None:
            on_batch(n)

    with bar:
        task = bar.add_task("encode", total=todo)
        for k in mine:
            encode_shard(out, s, k, source, vae, batch_size=batch_size, workers=workers, on_batch=step)
    if todo:
        seconds = time.time() - start
        log.info(f"rank {rank}: encoded {todo} images in {seconds:.1f} s ({todo / max(seconds, 1e-9):.1f} img/s)")
    return todo


def prepare_latents(data: str, out: str | os.PathLike, *, resolution: int = 256,
                    vae: str = "stabilityai/sd-vae-ft-ema", split: str = "train", batch_size: int = 64,
                    shard_size: int = 10_000, workers: int = 4, dtype: str = "float32", seed: int = 0,
                    limit: int | None = None, device: torch.device | str | None = None,
                    rank: int | None = None, world: int | None = None, progress: bool = True,
                    on_batch: Callable[[int], None] | None = None) -> dict:
    """Encode ``data`` into ``out`` (resuming an unfinished ``out``); returns ``latents.json``.

    Args:
        data: source images (``imagefolder:PATH``, ``hub:NAME`` or a registered RGB dataset).
        out: output directory.
        resolution: pixel side after the ADM centre crop; a multiple of the VAE's factor (8).
        vae: ``AutoencoderKL`` Hub id or local directory.
        batch_size: images per encoder call; shard_size: items per shard (the unit of resuming).
        workers: DataLoader workers decoding and cropping images.
        dtype: stored precision of mean and std (``float32`` as the official code, or ``float16``).
        seed: seed of the ε drawn for the statistics; limit: encode only the first ``limit`` items.
        device: encoder device (default: accelerate's device for this process: its GPU when present).
        rank, world: this process's share (default: accelerate's process index and count).
        on_batch: called with the batch size after every encoded batch (progress; tests interrupt here).
    """
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())   # CPU ranks (gloo) too, under torchrun
    rank = state.process_index if rank is None else rank
    world = state.num_processes if world is None else world
    device = torch.device(device) if device is not None else state.device
    out = Path(out).expanduser()
    main = rank == 0
    if (out / META_FILE).is_file():
        meta = read_meta(out)
        if (meta["source"], meta["resolution"], meta["vae"]) != (data, resolution, vae):
            raise DataError(f"{out} already holds latents of {meta['source']} at {meta['resolution']} px with "
                            f"{meta['vae']}; use another --out")
        log.info(f"{out} is already prepared ({meta['num_items']} items); nothing to do")
        return meta
    with state.main_process_first():   # the first process builds the HF cache, the others reuse it
        source = load_dataset(DataConfig(name=data, split=split, resolution=resolution))
    model = load_vae(vae, device, torch.float32)
    s = make_settings(data, split, resolution, vae, source, model, shard_size=shard_size, dtype=dtype, seed=seed,
                      limit=limit)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, s, write=True)
    if world > 1:
        state.wait_for_everyone()
    if not main:
        check_settings(out, s, write=False)
    if main:
        log.info(f"encoding {s.num_items} images of {data} at {resolution} px → latents {tuple(s.latent_shape)} "
                 f"with {vae} on {world} process(es), {s.num_shards} shards of {s.shard_size}")
    encode_rank(out, s, source, model, rank, world, batch_size=batch_size, workers=workers,
                progress=progress and main, on_batch=on_batch)
    if world > 1:
        state.wait_for_everyone()
    meta = merge_shards(out) if main else {}
    if world > 1:
        state.wait_for_everyone()
        meta = read_meta(out)
    if main:
        log.info(f"wrote {out}: {s.num_items} items, raw_mean {np.round(meta['raw_mean'], 4).tolist()}, "
                 f"raw_std {np.round(meta['raw_std'], 4).tolist()}")
    return meta
