"""Few-step sampling: an objective's ``step`` chained over a schedule, one generator per sample seed.

Image *i* depends only on its seed (noise and label are drawn from a generator seeded with it), so it is
the same whatever the batch size or the number of devices (edm2's per-seed generators).

Samples are in data units: pixels in ≈ [−1, 1], or normalised VAE latents for latent datasets.
:func:`output_decoder` turns either into uint8 images (for latents: the VAE decoder, ``docs/design/tvm.md`` §4);
pass it as ``sample(..., decode=...)`` to decode chunk by chunk on the sampling device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fewstep.contracts import Condition, DataSpec, Objective


@dataclass
class SampleResult:
    """Samples and their provenance.

    Attributes:
        images: (N, C, H, W) float32 in data units (pixels ≈ [−1, 1]), not clamped.
        labels: (N,) int64 labels used (``num_classes`` = null), or ``None`` for unconditional models.
        seeds: the N sample seeds.
        nfe: number of jumps (schedule length − 1).
        evaluations: backbone evaluations per sample (2·nfe with CFG at sampling).
        pixels: (N, 3|1, H', W') uint8 images when ``sample`` was given ``decode``, else ``None``.
    """

    images: Tensor
    labels: Tensor | None
    seeds: list[int]
    nfe: int
    evaluations: int
    pixels: Tensor | None = None


def output_decoder(data: Any, spec: DataSpec | dict, *, device: torch.device | str | None = None,
                   vae: Any = None, protocol: str | None = None) -> Callable[[Tensor], Tensor]:
    """What turns samples of a run's data into (N, C, H, W) uint8 images.

    Pixels: :func:`fewstep.images.to_uint8` (rounded). Latents (``spec.kind == "latents"``): a
    :class:`fewstep.data.vae.LatentDecoder` for the data config's latent format — denormalise with the
    recorded per-channel constants, VAE-decode (fp16 on CUDA), truncate to uint8 (``docs/design/tvm.md`` §4); the
    VAE (``vae``, else ``$FEWSTEP_VAE``, else the format's) is loaded on first use.

    Args:
        data: the run's :class:`~fewstep.config.DataConfig` (``cfg.data``).
        spec: its :class:`DataSpec` (or the ``data_spec`` dict of a checkpoint manifest).
        protocol: an evaluation protocol (:mod:`fewstep.metrics.protocols`) whose uint8 conversion to use
            (``None``: the defaults above, which are the ``clean`` protocol's).
    """
    import functools

    from fewstep.metrics.protocols import get_protocol

    proto = get_protocol(protocol or "clean")
    kind = spec.get("kind") if isinstance(spec, dict) else spec.kind
    if kind != "latents":
        from fewstep.images import to_uint8

        return to_uint8 if proto.pixels == "round" else functools.partial(to_uint8, rounding=proto.pixels)
    from fewstep.data.latents import latent_format_for
    from fewstep.data.vae import LatentDecoder

    return LatentDecoder(latent_format_for(data), vae=vae, device=device, rounding=proto.latents)


def sampling_autocast(device: torch.device, cfg: Any) -> bool:
    """Whether to sample under bf16 autocast: on CUDA, for runs trained in bf16 (``cfg``: the run's
    :class:`~fewstep.config.RunConfig`). Training grids, ``fewstep eval``, sweeps and :func:`fewstep.load`
    all sample this way, so their images agree."""
    return torch.device(device).type == "cuda" and cfg.train.precision == "bf16"


def parse_device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against this build
    and machine, so a device it cannot use is one clear error instead of a failure deep inside torch."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if torch.version.cuda is None else "sees no GPU"
            raise ValueError(f"--device {text}: this torch build ({torch.__version__}) {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there is no CUDA device {device.index} "
                             f"({torch.cuda.device_count()} visible); use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: fewstep runs on cpu or cuda, not {device.type}")
    return device


def parse_nfes(text: str) -> list[int]:
    """``"1,2,4"`` → [1, 2, 4]: numbers of sampler jumps, each ≥ 1."""
    try:
        nfes = [int(v) for v in text.split(",")]
    except ValueError:
        nfes = []
    if not nfes or any(n < 1 for n in nfes):
        raise ValueError(f"--nfe takes a comma list of jump counts ≥ 1 such as 1,2,4, got {text!r}")
    return nfes


def parse_seeds(text: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or ``"0-3,10"`` → list of non-negative ints (ranges inclusive)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad seed range {part!r} in {text!r}: use forms like 0-63 or 1,5,9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"bad seed range {part!r}: end before start")
        seeds.extend(range(lo, hi + 1))
    return seeds


def seed_noise_and_labels(seeds: list[int], shape: tuple[int, int, int], num_classes: int,
                          class_label: int | Sequence[int] | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-seed prior noise (N, C, H, W) and labels (N,): random classes, unless ``class_label`` gives
    one class for all or one per seed (the random draw still happens, so the noise stays the seed's)."""
    noise, labels = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(shape, generator=gen))
        if num_classes:
            labels.append(torch.randint(num_classes, (), generator=gen))
    y = None
    if num_classes:
        if class_label is None:
            y = torch.stack(labels)
        elif isinstance(class_label, int):
            y = torch.full((len(seeds),), class_label)
        else:
            y = torch.as_tensor(list(class_label), dtype=torch.int64)
    return torch.stack(noise), y


def renoise_generators(seeds: list[int], shape: tuple[int, int, int], num_classes: int) -> list[torch.Generator]:
    """One generator per seed, advanced past that seed's prior noise and label, so the fresh noise of
    re-noising samplers continues each seed's own stream (never reusing the prior noise)."""
    gens = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        torch.randn(shape, generator=gen)
        if num_classes:
            torch.randint(num_classes, (), generator=gen)
        gens.append(gen)
    return gens


@torch.no_grad()
def sample(objective: Objective, seeds: list[int], nfe: int, *, weights: str = "online",
           class_label: int | Sequence[int] | None = None, guidance: float | None = None, batch_size: int = 64,
           schedule: list[float] | None = None, device: torch.device | str | None = None,
           autocast: bool = False, decode: Callable[[Tensor], Tensor] | None = None) -> SampleResult:
    """Generate one image per seed with ``nfe`` jumps of the objective's sampler.

    Args:
        objective: a (possibly trained) objective; its backbone defines the image shape.
        seeds: sample seeds; image i depends only on seeds[i].
        nfe: number of jumps; the schedule defaults to ``objective.default_schedule(nfe)``.
        weights: ``online`` or an EMA track name.
        class_label: draw every image from this class, or image i from ``class_label[i]`` (default: a
            random class per seed).
        guidance: CFG scale w (objectives with guidance), default: the objective's own.
        batch_size: images per forward; does not change the results beyond float rounding.
        device: where to run (default: the sampling network's device).
        autocast: run the backbone under bf16 autocast (CUDA only).
        decode: samples → uint8 images (:func:`output_decoder`), applied per chunk; fills ``pixels``.
    """
    if batch_size < 1:
        raise ValueError(f"the sampling batch must be ≥ 1 images per forward, got {batch_size}")
    if nfe < 1:
        raise ValueError(f"nfe must be ≥ 1 jumps, got {nfe}")
    net = objective.sampling_net(weights)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    k = objective.num_classes
    per_seed = class_label is not None and not isinstance(class_label, int)
    if per_seed:
        class_label = [int(c) for c in class_label]
        if len(class_label) != len(seeds):
            raise ValueError(f"got {len(class_label)} labels for {len(seeds)} seeds (give one class, or one per seed)")
    for c in (class_label if per_seed else [class_label] if class_label is not None else []):
        if k and not 0 <= c < k:
            raise ValueError(f"class {c} is out of range: the model has {k} classes (0–{k - 1})")
    schedule = schedule if schedule is not None else objective.default_schedule(nfe)
    if len(schedule) != nfe + 1 or any(b > a for a, b in zip(schedule, schedule[1:])):
        raise ValueError(f"schedule must be {nfe + 1} non-increasing times, got {schedule}")
    shape = (net.in_channels, net.input_size, net.input_size)
    images, labels, pixels, evals = [], [], [], 0
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        x, y = seed_noise_and_labels(chunk, shape, k, class_label[start:start + batch_size] if per_seed else class_label)
        x, y = x.to(device), (y.to(device) if y is not None else None)
        w = torch.full((len(chunk),), float(guidance), device=device) if guidance is not None else None
        cond = Condition(y=y, guidance=w)
        evals = 0
        gens = renoise_generators(chunk, shape, k) if objective.needs.renoise else None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast and device.type == "cuda"):
            for t_cur, t_next in zip(schedule, schedule[1:]):
                t = torch.full((len(chunk),), t_cur, device=device)
                s = torch.full((len(chunk),), t_next, device=device)
                noise = None
                if gens is not None:   # per-seed fresh noise for re-noising samplers
                    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
                x = objective.step(x, t, s, cond, net=net, noise=noise).float()
                evals += objective.evaluations_per_step(cond)
        images.append(x.cpu())
        if decode is not None:
            pixels.append(decode(x).cpu())
        if y is not None:
            labels.append(y.cpu())
    return SampleResult(images=torch.cat(images), labels=torch.cat(labels) if labels else None,
                        seeds=list(seeds), nfe=nfe, evaluations=evals,
                        pixels=torch.cat(pixels) if pixels else None)
