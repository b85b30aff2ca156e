"""FID evaluation under the papers' protocol, on any number of processes (``fewstep eval``, ``fewstep fid-ref``).

Protocol (``docs/design/tvm.md`` §5, edm2/ADM): ``num`` images (50 000 for the published numbers) from sample seeds
``seed … seed + num − 1`` with the EMA weights, each image from its own seed's generator
(:func:`fewstep.sample.seed_noise_and_labels`: prior noise and a uniformly random class), so image i is
the same whatever the batch size or the number of processes. Images are quantised to uint8 and resized
as the evaluation ``protocol`` says (:mod:`fewstep.metrics.protocols`: ``clean`` by default, ``adm`` and
``edm2`` as those papers' evaluators) and go to the feature extractor; feature sums are streamed
(:class:`~fewstep.metrics.fid.FeatureStats`) and all-reduced over processes. The FID is the Fréchet
distance to reference statistics written by :func:`make_reference` from a dataset with the same
extractor; statistics from another extractor, weights file, resize, protocol or image size are refused.
With ``precision_recall`` the generated features are kept and scored against the reference's stored
features (Kynkäänniemi et al., k = 3); extractors with class probabilities also give the Inception Score
(:mod:`fewstep.metrics.quality`).

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
from fewstep.sample import sample, sampling_autocast

log = logging.getLogger(__name__)

STATS_FORMAT = "fewstep-fid-stats/1"
CHECKED_FIELDS = ("extractor", "weights_sha256", "resize", "protocol", "resolution", "channels")
REFERENCE_FEATURES = 10000   # features kept in reference statistics for precision/recall (ADM keeps 10 000)


@dataclass
class ReferenceStats:
    """Reference statistics read from an ``.npz``: μ (D,), Σ (D, D) float64, their metadata and, where
    kept, the first items' features (K, D) float32 for precision/recall."""

    mu: np.ndarray
    sigma: np.ndarray
    metadata: dict[str, Any] | None
    path: Path
    features: np.ndarray | None = None


def save_stats(path: str | os.PathLike, stats: FeatureStats, metadata: dict[str, Any],
               features: torch.Tensor | None = None) -> Path:
    """Write ``mu``, ``sigma`` (float64), ``metadata`` (a JSON string) and optionally ``features`` (float32)
    to an ``.npz``, atomically."""
    meta = {"format": STATS_FORMAT, **metadata, "count": stats.n}
    arrays = {"mu": stats.mean().cpu().numpy(), "sigma": stats.cov().cpu().numpy(), "metadata": np.array(json.dumps(meta))}
    if features is not None:
        arrays["features"] = features.float().cpu().numpy()

    def savez(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)

    return write_atomic(path, savez)


def load_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read statistics written by :func:`save_stats` (or any ``.npz`` with ``mu``/``sigma``: metadata None).
    Files written before protocols existed are ``clean``."""
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
            if meta is not None:
                meta.setdefault("protocol", "clean")
            features = data["features"] if "features" in data else None
            return ReferenceStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), meta, path, features)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:   # not an .npz, truncated, unreadable, bad metadata JSON
        raise ValueError(f"reference statistics {path} cannot be read ({exc}); make them again with "
                         f"`fewstep fid-ref`") from exc


def check_reference(ref: ReferenceStats, expected: dict[str, Any], trust: bool = False) -> None:
    """Refuse reference statistics whose identity differs from ``expected`` in any of :data:`CHECKED_FIELDS`
    (the message names each differing field); ``trust`` accepts files without fewstep metadata. An
    ``expected`` without ``protocol`` means ``clean``."""
    expected = {"protocol": "clean", **expected}
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


@dataclass
class Collected:
    """What one extractor gave for a set of images, over all processes.

    Attributes:
        stats: streamed feature statistics.
        features: (N, D) float32 features in seed order, when kept (precision/recall), else ``None``.
        probabilities: (N, K) class probabilities in seed order, when the extractor has them, else ``None``.
    """

    stats: FeatureStats
    features: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None


def _gather_rows(local: list[torch.Tensor], total: int) -> torch.Tensor:
    """Rows each process computed for seeds ``rank::world`` → all rows in seed order (on the CPU)."""
    mine = torch.cat(local).cpu() if local else torch.zeros(0)
    rank, world = _dist()
    if world == 1:
        return mine
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    out = torch.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def sample_features(objective: Objective, seeds: Sequence[int], nfe: int, extractors: Sequence[FeatureExtractor], *,
                    batch: int = 64, weights: str = "ema", guidance: float | None = None,
                    class_label: int | None = None, autocast: bool = False, keep_features: bool = False,
                    on_batch: Callable[[int], None] | None = None,
                    decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8) -> tuple[list[Collected], int]:
    """Features of the images of ``seeds`` at ``nfe`` jumps for every extractor (the images are sampled
    once), summed over all processes.

    Each process samples ``seeds[rank::world]`` in chunks of ``batch``; every process must call this
    (the sums are all-reduced). ``keep_features`` also keeps every feature vector (for precision/recall);
    class probabilities are kept where an extractor has them (for the Inception Score). ``on_batch(k)``
    is told the number of images just added locally; ``decode`` turns samples into uint8 images (the
    protocol's conversion, or a VAE decoder for latent runs). Returns one :class:`Collected` per extractor
    and the backbone evaluations per image.
    """
    rank, world = _dist()
    mine = list(seeds)[rank::world]
    stats = [FeatureStats(ex.feature_dim, device=ex.device) for ex in extractors]
    kept: list[list[torch.Tensor]] = [[] for _ in extractors]
    probs: list[list[torch.Tensor]] = [[] for _ in extractors]
    evaluations = 0
    for start in range(0, len(mine), batch):
        chunk = mine[start:start + batch]
        result = sample(objective, chunk, nfe, weights=weights, guidance=guidance, class_label=class_label,
                        batch_size=len(chunk), autocast=autocast)
        images = decode(result.images)
        for i, ex in enumerate(extractors):
            features, p = ex.extract(images)
            stats[i].update(features)
            if keep_features:
                kept[i].append(features.float().cpu())
            if p is not None:
                probs[i].append(p.double().cpu())
        evaluations = result.evaluations
        if on_batch:
            on_batch(len(chunk))
    out = []
    for i, ex in enumerate(extractors):
        out.append(Collected(stats[i].all_reduce(),
                             _gather_rows(kept[i], len(seeds)) if keep_features else None,
                             _gather_rows(probs[i], len(seeds)) if ex.has_probabilities else None))
    return out, evaluations


def sample_statistics(objective: Objective, seeds: Sequence[int], nfe: int, extractor: FeatureExtractor, *,
                      batch: int = 64, weights: str = "ema", guidance: float | None = None,
                      class_label: int | None = None, autocast: bool = False,
                      on_batch: Callable[[int], None] | None = None,
                      decode: Callable[[torch.Tensor], torch.Tensor] = to_uint8) -> tuple[FeatureStats, int]:
    """Feature statistics of the images of ``seeds`` at ``nfe`` jumps for one extractor (see
    :func:`sample_features`). Returns the statistics and the backbone evaluations per image."""
    collected, evaluations = sample_features(objective, seeds, nfe, [extractor], batch=batch, weights=weights,
                                             guidance=guidance, class_label=class_label, autocast=autocast,
                                             on_batch=on_batch, decode=decode)
    return collected[0].stats, evaluations


def dataset_statistics(dataset: Any, extractor: FeatureExtractor, *, num: int | None = None, batch: int = 256,
                       on_batch: Callable[[int], None] | None = None, keep_features: int = 0
                       ) -> FeatureStats | tuple[FeatureStats, torch.Tensor]:
    """Feature statistics of dataset items 0 … num − 1 (default all), dealt round-robin to processes.

    Dataset images are stored uint8 (or converted exactly), so they are quantised by rounding whatever the
    protocol. With ``keep_features`` = K > 0 also returns the features of items 0 … K − 1 (K, D).
    """
    rank, world = _dist()
    num = len(dataset) if num is None else num
    if not 2 <= num <= len(dataset):
        raise ValueError(f"num must be in [2, {len(dataset)}] (the dataset's size), got {num}")
    indices = torch.arange(rank, num, world)
    stats = FeatureStats(extractor.feature_dim, device=extractor.device)
    kept: list[torch.Tensor] = []
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        if hasattr(dataset, "get_batch"):
            x, _ = dataset.get_batch(idx)
        else:
            x = torch.stack([dataset[int(i)][0] for i in idx])
        features = extractor(to_uint8(x))
        stats.update(features)
        if keep_features:
            kept.append(features[idx < keep_features].float().cpu())
        if on_batch:
            on_batch(len(idx))
    stats.all_reduce()
    if not keep_features:
        return stats
    return stats, _gather_rows(kept, min(keep_features, num))


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled)


def _processes():
    """This process's place among the evaluating processes, and its device.

    Accelerate's ``PartialState``, not an ``Accelerator``: an ``Accelerator`` fixes the process's mixed
    precision once and for all, so an evaluation that ran first (a sweep worker resuming at an evaluation
    point) made the next ``train()`` in bf16 fail with "AcceleratorState has already been initialized".
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_reference(data: Any, out: str | os.PathLike, *, extractor: str = "inception",
                   extractor_options: dict | None = None, num: int | None = None, batch: int = 256,
                   protocol: str = "clean", keep_features: int = REFERENCE_FEATURES,
                   show_progress: bool = True) -> dict[str, Any]:
    """Reference statistics of a dataset (``fewstep fid-ref``), written to ``out`` by the main process.

    Args:
        data: a :class:`~fewstep.config.DataConfig` (or a dataset name).
        out: the ``.npz`` to write.
        extractor, extractor_options: see :func:`~fewstep.metrics.extractors.make_extractor` (the
            protocol's resize is added for ``inception``).
        num: number of items (default: the whole split).
        batch: images per extractor call per process.
        protocol: ``clean``, ``adm`` or ``edm2`` (:mod:`fewstep.metrics.protocols`), recorded.
        keep_features: store the features of the first this many items (precision/recall; 0: none).
    Returns:
        The metadata written (extractor identity, ``protocol``, ``resolution``, ``channels``, ``count``,
        ``dataset``, ``split``, ``features``).
    """
    from fewstep.config import DataConfig
    from fewstep.data import load_dataset
    from fewstep.metrics.protocols import extractor_options as protocol_options

    cfg = DataConfig(name=data) if isinstance(data, str) else data
    acc = _processes()
    dataset = load_dataset(cfg)
    spec = dataset.spec
    if spec.kind != "pixels":
        raise ValueError(f"FID needs pixel images; dataset {cfg.name!r} holds {spec.kind}")
    ex = make_extractor(extractor, device=acc.device, **{**protocol_options(extractor, protocol),
                                                           **(extractor_options or {})})
    n = len(dataset) if num is None else num
    with _progress(show_progress and acc.is_main_process) as bar:
        task = bar.add_task(f"features of {cfg.name}", total=n)
        result = dataset_statistics(dataset, ex, num=num, batch=batch, keep_features=keep_features,
                                    on_batch=lambda k: bar.advance(task, k * acc.num_processes))
    stats, features = result if keep_features else (result, None)
    meta = {**ex.metadata(), "protocol": protocol, "resolution": spec.resolution, "channels": spec.channels,
            "dataset": cfg.name, "split": cfg.split, "data_resolution_option": cfg.resolution,
            "features": 0 if features is None else int(features.shape[0])}
    if acc.is_main_process:
        save_stats(out, stats, meta, features)
    acc.wait_for_everyone()
    return {**meta, "count": stats.n}


def evaluate_fid(run: str | os.PathLike, nfes: Sequence[int], num: int, ref: str | os.PathLike, *,
                 extractor: str = "inception", extractor_options: dict | None = None, seed: int = 0,
                 batch: int = 64, weights: str | None = None, guidance: float | None = None,
                 class_label: int | None = None, out: str | os.PathLike | None = None, trust_ref: bool = False,
                 protocol: str = "clean", precision_recall: bool = False,
                 also: Sequence[tuple[str, str | os.PathLike]] = (), show_progress: bool = True) -> dict[str, Any]:
    """FID of a trained run at each NFE (``fewstep eval``); the main process writes the JSON.

    Args:
        run: run directory (newest valid checkpoint), one checkpoint directory or an exported model.
        nfes: sampler jumps to evaluate, e.g. (1, 2, 4).
        num: images per NFE (50 000 for the papers' numbers); seeds ``seed … seed + num − 1``.
        ref: reference statistics from :func:`make_reference` (checked against the extractor, protocol
            and images).
        batch: images per sampler/extractor call per process (does not change the images).
        weights: ``online`` or an EMA track (default: the run's ``sample.weights``, the EMA).
        out: JSON path (default ``<run dir>/fid.json``).
        protocol: ``clean``, ``adm`` or ``edm2``: the samples' uint8 conversion and the Inception resize.
        precision_recall: also precision and recall (k = 3) of the primary extractor's features against
            the reference's stored features.
        also: more (extractor, reference) pairs scored on the same images (e.g. ``fmnist-classifier``
            beside ``inception``); their results go under ``also``.
    Returns:
        The JSON body: ``metric`` (``FID``, or ``FD (<extractor>)`` in another extractor's features), ``fid``
        (NFE → that Fréchet distance), ``num``, ``seed``, ``weights``, ``guidance``, ``protocol``,
        ``evaluations``, ``seconds``, ``images_per_second``, ``extractor``, ``ref`` (path and metadata),
        ``checkpoint`` (path, step, kimg), ``dataset``, ``num_processes``; ``inception_score`` (NFE →
        [mean, std]) where the extractor has class probabilities; ``precision``/``recall`` (NFE → value)
        when asked; ``also`` (extractor → the same entries).
    """
    from fewstep.build import load_objective
    from fewstep.metrics.protocols import extractor_options as protocol_options, get_protocol
    from fewstep.metrics.quality import inception_score, precision_recall as pr

    get_protocol(protocol)
    acc = _processes()
    pairs = [(extractor, ref, extractor_options or {})] + [(name, path, {}) for name, path in also]
    extractors = [make_extractor(name, device=acc.device, **{**protocol_options(name, protocol), **opts})
                  for name, _, opts in pairs]                                  # missing weights: fail first
    objective, cfg, ckpt = load_objective(run, device=acc.device, weights=weights)
    spec = ckpt.field("data_spec")
    kind = spec.get("kind", "pixels")
    if kind == "points":
        raise ValueError("FID needs images; this run generates points (see metrics.json of the toy evaluation)")
    from fewstep.sample import output_decoder

    decode = output_decoder(cfg.data, spec, device=acc.device, protocol=protocol)   # latents: VAE-decoded (docs/design/tvm.md §4)
    resolution = decode.fmt.resolution if kind == "latents" else spec["resolution"]
    channels = 3 if kind == "latents" else spec["channels"]
    references = []
    for ex, (_, path, _) in zip(extractors, pairs):
        expected = {**ex.metadata(), "protocol": protocol, "resolution": resolution, "channels": channels}
        reference = load_stats(path)
        check_reference(reference, expected, trust=trust_ref)
        if precision_recall and not references and reference.features is None:
            raise ValueError(f"reference statistics {reference.path} hold no features for precision/recall; "
                             f"remake them with `fewstep fid-ref` (it keeps the first {REFERENCE_FEATURES} "
                             "items' features; --features N)")
        if reference.metadata and reference.metadata.get("dataset") != cfg.data.name:
            log.info(f"note: reference statistics are of {reference.metadata.get('dataset')!r}, "
                     f"the run trained on {cfg.data.name!r}")
        references.append(reference)
    weights = weights or cfg.sample.weights
    autocast = sampling_autocast(acc.device, cfg)
    seeds = list(range(seed, seed + num))
    results = [{"fid": {}} for _ in extractors]
    body: dict[str, Any] = {"evaluations": {}, "seconds": {}, "images_per_second": {}}
    for nfe in nfes:
        t0 = time.perf_counter()
        with _progress(show_progress and acc.is_main_process) as bar:
            task = bar.add_task(f"{extractors[0].metric_name} {nfe}-NFE", total=num)
            collected, evaluations = sample_features(
                objective, seeds, nfe, extractors, batch=batch, weights=weights, guidance=guidance,
                class_label=class_label, autocast=autocast, keep_features=precision_recall,
                on_batch=lambda k: bar.advance(task, k * acc.num_processes), decode=decode)
        k = str(nfe)
        for res, got, reference in zip(results, collected, references):
            res["fid"][k] = frechet_distance(got.stats.mean(), got.stats.cov(), reference.mu, reference.sigma)
            if got.probabilities is not None and num >= 10:
                res.setdefault("inception_score", {})[k] = list(inception_score(got.probabilities))
            if precision_recall and res is results[0]:     # the primary extractor's features only
                p, r = pr(torch.from_numpy(reference.features), got.features)
                res.setdefault("precision", {})[k], res.setdefault("recall", {})[k] = p, r
        seconds = time.perf_counter() - t0
        body["seconds"][k] = round(seconds, 3)
        body["images_per_second"][k] = round(num / seconds, 2)
        body["evaluations"][k] = evaluations
        extra = "".join(f", precision {results[0]['precision'][k]:.4f}, recall {results[0]['recall'][k]:.4f}"
                        for _ in [0] if precision_recall)
        log.info(f"{extractors[0].metric_name} {nfe}-NFE: {results[0]['fid'][k]:.4f}{extra} ({num} images, "
                 f"{seconds:.1f} s)")
    for res, ex, reference in zip(results, extractors, references):
        res.update({"metric": ex.metric_name, "extractor": ex.metadata(),
                    "ref": {"path": str(reference.path), "metadata": reference.metadata}})
    body.update(results[0])
    body.update({
        "num": num, "seed": seed, "weights": weights, "guidance": guidance, "class_label": class_label,
        "protocol": protocol, "checkpoint": {"path": str(ckpt.path), "step": ckpt.step, "kimg": ckpt.manifest.get("kimg")},
        "dataset": cfg.data.name, "num_processes": acc.num_processes,
    })
    if len(results) > 1:
        body["also"] = {pairs[i][0]: results[i] for i in range(1, len(results))}
    if acc.is_main_process:
        from fewstep.export import is_exported

        home = ckpt.path if is_exported(ckpt.path) else ckpt.path.parent   # the run (or exported model) directory
        write_json(Path(out) if out else home / "fid.json", body)
    acc.wait_for_everyone()
    return body
