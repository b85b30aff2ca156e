"""FID evaluation under the papers' protocol, on any number of processes (``fewstep eval``, ``fewstep fid-ref``).

Protocol (``docs/design/tvm.md`` §5, edm2/ADM): ``num`` images (50 000 for the published numbers) from sample seeds
``seed … seed + num − 1`` with the EMA weights, each image from its own seed's generator
(:func:`fewstep.sample.seed_noise_and_labels`: prior noise and a uniformly random class), so image i is
the same whatever the batch size or the number of processes. Images are quantised to uint8 exactly as
a PNG writer would (:func:`fewstep.images.to_uint8`) and go straight to the feature extractor; feature
sums are streamed (:class:`~fewstep.metrics.fid.FeatureStats`) and all-reduced over processes. The FID
is the Fréchet distance to reference statistics written by :func:`make_reference` from a dataset with
the same extractor; statistics from another extractor, weights file, resize or image size are refused.

Seeds are dealt to processes round-robin (process r takes images r, r + P, …); run with
``accelerate launch -m fewstep.cli eval …`` for several GPUs (with ``torchrun``, put ``--`` before
``fewstep.cli``: torchrun's parser would otherwise take ``--run`` for an abbreviation of ``--run-path``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fewstep.contracts import Objective
from fewstep.files import write_atomic, write_json
from fewstep.images import to_uint8
from fewstep.metrics.extractors import FeatureExtractor, make_extractor
from fewstep.metrics.fid import FeatureStats, frechet_distance
from fewstep.sample import sample

log = logging.getLogger(__name__)

STATS_FORMAT = "fewstep-fid-stats/1"
CHECKED_FIELDS = ("extractor", "weights_sha256", "resize", "resolution", "channels")


@dataclass
class ReferenceStats:
    """Reference statistics read from an ``.npz``: μ (D,), Σ (D, D) float64 and their metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    metadata: dict[str, Any] | None
    path: Path


def save_stats(path: str | os.PathLike, stats: FeatureStats, metadata: dict[str, Any]) -> Path:
    """Write ``mu``, ``sigma`` (float64) and ``metadata`` (a JSON string) to an ``.npz``, atomically."""
    meta = {"format": STATS_FORMAT, **metadata, "count": stats.n}
    arrays = {"mu": stats.mean().cpu().numpy(), "sigma": stats.cov().cpu().numpy(), "metadata": np.array(json.dumps(meta))}

    def savez(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)

    return write_atomic(path, savez)


def load_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read statistics written by :func:`save_stats` (or any ``.npz`` with ``mu``/``sigma``: metadata None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reference statistics at {path} (make them with `fewstep fid-ref`)")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("it is not an .npz archive")
        data = np.load(path, allow_pickle=False)
        with data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"it holds no 'mu'/'sigma' arrays (keys: {', '.join(data.files)})")
            meta = json.loads(str(data["metadata"])) if "metadata" in data else None
            return ReferenceStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), meta, path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:   # not an .npz, truncated, unreadable, bad metadata JSON
        raise ValueError(f"reference statistics {path} cannot be read ({exc}); make them again with "
                         f"`fewstep fid-ref`") from exc


def check_reference(ref: ReferenceStats, expected: dict[str, Any], trust: bool = False) -> None:
    """Refuse reference statistics whose identity differs from ``expected`` in any of :data:`CHECKED_FIELDS`
    (the message names each differing field); ``trust`` accepts files without fewstep metadata."""
    if ref.metadata is None and not trust:
        raise ValueError(f"{ref.path} has no fewstep metadata (made by another tool?), so its extractor and "
                         "image size cannot be checked; pass --trust-ref to use it anyway")
    diffs = [f"{k}: reference {ref.metadata.get(k)!r}, here {expected.get(k)!r}"
             for k in CHECKED_FIELDS if ref.metadata is not None and ref.metadata.get(k) != expected.get(k)]
    if diffs:
        raise ValueError(f"reference statistics {ref.path} were made differently; refusing to compare:\n  "
                         + "\n  ".join(diffs))
    if ref.mu.shape != (expected["feature_dim"],) or ref.sigma.shape != (expected["feature_dim"],) * 2:
        raise ValueError(f"{ref.path} has {ref.mu.shape[0]}-d features; extractor {expected['extractor']!r} "
                         f"gives {expected['feature_dim']}-d")


def _dist() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_statistics(objective: Objective, seeds: Sequence[int], nfe: int, extractor: FeatureExtractor, *,
                      batch: int = 64, weights: str = "ema", guidance: float | None = None,
                      class_label: int | None = None, autocast: bool = False,
                      on_batch: Callable[[int], None] | None = None,
                      decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8) -> tuple[FeatureStats, int]:
    """Feature statistics of the images of ``seeds`` at ``nfe`` jumps, summed over all processes.

    Each process samples ``seeds[rank::world]`` in chunks of ``batch``; every process must call this
    (the sums are all-reduced). ``on_batch(k)`` is told the number of images just added locally;
    ``decode`` turns samples into uint8 images (a VAE decoder for latent runs).
    Returns the statistics and the backbone evaluations per image.
    """
    rank, world = _dist()
    mine = list(seeds)[rank::world]
    stats = FeatureStats(extractor.feature_dim, device=extractor.device)
    evaluations = 0
    for start in range(0, len(mine), batch):
        chunk = mine[start:start + batch]
        result = sample(objective, chunk, nfe, weights=weights, guidance=guidance, class_label=class_label,
                        batch_size=len(chunk), autocast=autocast)
        stats.update(extractor(decode(result.images)))
        evaluations = result.evaluations
        if on_batch:
            on_batch(len(chunk))
    return stats.all_reduce(), evaluations


def dataset_statistics(dataset: Any, extractor: FeatureExtractor, *, num: int | None = None, batch: int = 256,
                       on_batch: Callable[[int], None] | None = None) -> FeatureStats:
    """Feature statistics of dataset items 0 … num − 1 (default all), dealt round-robin to processes."""
    rank, world = _dist()
    num = len(dataset) if num is None else num
    if not 2 <= num <= len(dataset):
        raise ValueError(f"num must be in [2, {len(dataset)}] (the dataset's size), got {num}")
    indices = torch.arange(rank, num, world)
    stats = FeatureStats(extractor.feature_dim, device=extractor.device)
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        if hasattr(dataset, "get_batch"):
            x, _ = dataset.get_batch(idx)
        else:
            x = torch.stack([dataset[int(i)][0] for i in idx])
        stats.update(extractor(to_uint8(x)))
        if on_batch:
            on_batch(len(idx))
    return stats.all_reduce()


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def make_reference(data: Any, out: str | os.PathLike, *, extractor: str = "inception",
                   extractor_options: dict | None = None, num: int | None = None, batch: int = 256,
                   show_progress: bool = True) -> dict[str, Any]:
    """Reference statistics of a dataset (``fewstep fid-ref``), written to ``out`` by the main process.

    Args:
        data: a :class:`~fewstep.config.DataConfig` (or a dataset name).
        out: the ``.npz`` to write.
        extractor, extractor_options: see :func:`~fewstep.metrics.extractors.make_extractor`.
        num: number of items (default: the whole split).
        batch: images per extractor call per process.
    Returns:
        The metadata written (extractor identity, ``resolution``, ``channels``, ``count``, ``dataset``, ``split``).
    """
    from fewstep.config import DataConfig
    from fewstep.data import load_dataset

    cfg = DataConfig(name=data) if isinstance(data, str) else data
    acc = _accelerator()
    dataset = load_dataset(cfg)
    spec = dataset.spec
    if spec.kind != "pixels":
        raise ValueError(f"FID needs pixel images; dataset {cfg.name!r} holds {spec.kind}")
    ex = make_extractor(extractor, device=acc.device, **(extractor_options or {}))
    n = len(dataset) if num is None else num
    with _progress(show_progress and acc.is_main_process) as bar:
        task = bar.add_task(f"features of {cfg.name}", total=n)
        stats = dataset_statistics(dataset, ex, num=num, batch=batch,
                                   on_batch=lambda k: bar.advance(task, k * acc.num_processes))
    meta = {**ex.metadata(), "resolution": spec.resolution, "channels": spec.channels, "dataset": cfg.name,
            "split": cfg.split, "data_resolution_option": cfg.resolution}
    if acc.is_main_process:
        save_stats(out, stats, meta)
    acc.wait_for_everyone()
    return {**meta, "count": stats.n}


def evaluate_fid(run: str | os.PathLike, nfes: Sequence[int], num: int, ref: str | os.PathLike, *,
                 extractor: str = "inception", extractor_options: dict | None = None, seed: int = 0,
                 batch: int = 64, weights: str | None = None, guidance: float | None = None,
                 class_label: int | None = None, out: str | os.PathLike | None = None, trust_ref: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """FID of a trained run at each NFE (``fewstep eval``); the main process writes the JSON.

    Args:
        run: run directory (newest valid checkpoint), one checkpoint directory or an exported model.
        nfes: sampler jumps to evaluate, e.g. (1, 2, 4).
        num: images per NFE (50 000 for the papers' numbers); seeds ``seed … seed + num − 1``.
        ref: reference statistics from :func:`make_reference` (checked against the extractor and images).
        batch: images per sampler/extractor call per process (does not change the images).
        weights: ``online`` or an EMA track (default: the run's ``sample.weights``, the EMA).
        out: JSON path (default ``<run dir>/fid.json``).
    Returns:
        The JSON body: ``metric`` (``FID``, or ``FD (<extractor>)`` in another extractor's features), ``fid``
        (NFE → that Fréchet distance), ``num``, ``seed``, ``weights``, ``guidance``, ``evaluations``,
        ``seconds``, ``images_per_second``, ``extractor``, ``ref`` (path and metadata), ``checkpoint``
        (path, step, kimg), ``dataset`` and ``num_processes``.
    """
    from fewstep.build import load_objective

    acc = _accelerator()
    ex = make_extractor(extractor, device=acc.device, **(extractor_options or {}))   # missing weights: fail first
    objective, cfg, ckpt = load_objective(run, device=acc.device, weights=weights)
    spec = ckpt.field("data_spec")
    kind = spec.get("kind", "pixels")
    if kind == "points":
        raise ValueError("FID needs images; this run generates points (see metrics.json of the toy evaluation)")
    from fewstep.sample import output_decoder

    decode = output_decoder(cfg.data, spec, device=acc.device)     # latents: VAE-decoded as docs/design/tvm.md §4
    if kind == "latents":
        expected = {**ex.metadata(), "resolution": decode.fmt.resolution, "channels": 3}
    else:
        expected = {**ex.metadata(), "resolution": spec["resolution"], "channels": spec["channels"]}
    reference = load_stats(ref)
    check_reference(reference, expected, trust=trust_ref)
    if reference.metadata and reference.metadata.get("dataset") != cfg.data.name:
        log.info(f"note: reference statistics are of {reference.metadata.get('dataset')!r}, "
                  f"the run trained on {cfg.data.name!r}")
    weights = weights or cfg.sample.weights
    autocast = acc.device.type == "cuda" and cfg.train.precision == "bf16"
    seeds = list(range(seed, seed + num))
    body: dict[str, Any] = {"fid": {}, "evaluations": {}, "seconds": {}, "images_per_second": {}}
    for nfe in nfes:
        t0 = time.perf_counter()
        with _progress(show_progress and acc.is_main_process) as bar:
            task = bar.add_task(f"{ex.metric_name} {nfe}-NFE", total=num)
            stats, evaluations = sample_statistics(
                objective, seeds, nfe, ex, batch=batch, weights=weights, guidance=guidance, class_label=class_label,
                autocast=autocast, on_batch=lambda k: bar.advance(task, k * acc.num_processes), decode=decode)
        fid = frechet_distance(stats.mean(), stats.cov(), reference.mu, reference.sigma)
        seconds = time.perf_counter() - t0
        k = str(nfe)
        body["fid"][k], body["seconds"][k] = fid, round(seconds, 3)
        body["images_per_second"][k] = round(num / seconds, 2)
        body["evaluations"][k] = evaluations
        log.info(f"{ex.metric_name} {nfe}-NFE: {fid:.4f} ({num} images, {seconds:.1f} s)")
    body.update({
        "metric": ex.metric_name, "num": num, "seed": seed, "weights": weights, "guidance": guidance, "class_label": class_label,
        "extractor": ex.metadata(), "ref": {"path": str(reference.path), "metadata": reference.metadata},
        "checkpoint": {"path": str(ckpt.path), "step": ckpt.step, "kimg": ckpt.manifest.get("kimg")},
        "dataset": cfg.data.name, "num_processes": acc.num_processes,
    })
    if acc.is_main_process:
        from fewstep.export import is_exported

        home = ckpt.path if is_exported(ckpt.path) else ckpt.path.parent   # the run (or exported model) directory
        write_json(Path(out) if out else home / "fid.json", body)
    acc.wait_for_everyone()
    return body

