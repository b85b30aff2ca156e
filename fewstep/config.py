"""Typed run configuration: one dataclass per component, strict dict round trips and ``key=value`` overrides.

A run is described by a :class:`RunConfig`. Recipes (``fewstep.recipes``) are functions returning one;
the CLI selects a recipe and overrides fields with ``--set section.field=value``. Unknown keys and
values of the wrong type are errors that name the key and suggest the closest valid ones. The objective
and backbone sections are polymorphic: their dataclass is the one the named component declares, so
``objective.label_dropout`` exists only for objectives that have it.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Literal

from fewstep.registry import closest


class ConfigError(ValueError):
    """A config key, value or type that does not fit the dataclass it targets."""


def require(checks: Iterable[tuple[bool, str]], where: str = "", error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` with the message of the first failing ``(ok, message)`` check, prefixed ``where: `` when
    given: the one way config classes check their fields (``__post_init__``) and the trainer a whole config."""
    for ok, message in checks:
        if not ok:
            raise error(f"{where}: {message}" if where else message)


# ---------------------------------------------------------------------------------------------------
# Component configs
# ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ObjectiveConfig:
    """Base of every objective's config; subclasses add the objective's own fields."""

    name: str


@dataclass(kw_only=True)
class BackboneConfig:
    """Base of every backbone's config; subclasses add architecture fields and ``build``."""

    name: str

    def build(self, data: "DataSpec") -> Any:  # noqa: F821 (DataSpec lives in fewstep.data)
        raise NotImplementedError(f"{type(self).__name__} does not define build()")


@dataclass(kw_only=True)
class DataConfig:
    """Where training images come from.

    Attributes:
        name: a registered dataset (``fashion-mnist``), ``imagefolder:PATH`` or ``hub:NAME``.
        root: directory holding the dataset's files (default: the dataset's own search path).
        split: ``train`` or ``test`` (where the dataset has both).
        resolution: square side to centre-crop and resize to (image folders and hub datasets);
            ``None`` keeps the dataset's native size (Fashion-MNIST is padded to 32).
        num_workers: DataLoader worker processes per device.
    """

    name: str = "fashion-mnist"
    root: str | None = None
    split: str = "train"
    resolution: int | None = None
    num_workers: int = 0


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and bookkeeping. Durations and intervals are in kimg (thousands of images seen).

    Attributes:
        total_kimg: training length in thousands of images.
        batch: global images per optimizer step (over all devices and accumulation rounds).
        batch_per_gpu: images per device per forward; ``None`` means ``batch / num_devices`` (no
            gradient accumulation). Accumulation rounds = batch / (num_devices * batch_per_gpu).
        lr, betas, eps, weight_decay: AdamW settings; ``lr`` is the peak learning rate.
        lr_schedule: ``constant``, ``cosine`` (to ``lr_min`` over ``lr_decay_kimg``, default the rest of
            the run) or ``rsqrt`` (edm2: ``lr / sqrt(max(kimg / lr_decay_kimg, 1))``); see
            :mod:`fewstep.schedules`.
        lr_warmup_kimg: linear learning-rate warm-up from 0 over this many kimg (0: none).
        lr_decay_kimg: cosine: length of the decay; rsqrt: where the decay starts (required).
        lr_min: the cosine schedule's final learning rate.
        grad_clip: max global gradient norm, or ``None`` for no clipping.
        ema_betas: evaluation EMA tracks, name → per-step decay (e.g. ``{"ema": 0.9999}``).
        ema_halflife_kimg: evaluation EMA tracks, name → half-life in kimg (EDM): the horizon in images
            does not change with ``batch``.
        ema_rampup_ratio: with ``ema_halflife_kimg``, cap each half-life at this fraction of the images
            seen (EDM uses 0.05); ``None``: no cap.
        ema_power_std: evaluation EMA tracks, name → σ_rel of edm2's power-function EMA (e.g.
            ``{"ema_050": 0.05, "ema_100": 0.10}``). Track names are unique over the three kinds.
        precision: ``bf16`` (autocast on CUDA, fp32 master weights) or ``fp32``. CPU always runs fp32.
        allow_tf32: allow TF32 matmuls on CUDA.
        status_kimg, checkpoint_kimg, sample_kimg: intervals for the status line (and JSONL log),
            checkpoints and sample grids; 0 disables checkpoints/grids at intervals (a final
            checkpoint is always written).
        keep_checkpoints: number of most recent checkpoints kept.
        seed: global seed; per-device streams derive from it.
        max_bad_steps: a step whose loss or gradient norm is non-finite is skipped (no update, no EMA
            step) and logged; after this many consecutive skipped steps training stops with an error.
        max_minutes: wall-clock training budget in minutes, summed over resumes (``None``: no budget;
            each invocation's clock starts after its first step, so compiling and warm-up are free).
            Training stops after the step during which it ran out (the clock is read once per step,
            before the optimizer update; with several processes, any rank's clock stops all of them), with
            a final checkpoint; the run then counts as finished, like one that reached ``total_kimg``.
        compile: ``torch.compile`` the backbones' blocks (:mod:`fewstep.compiling`; CUDA). Same
            results up to float rounding; the first steps take longer while graphs compile.
        compile_tuning: with ``compile``, let Inductor tune the launch configs of its fused
            element-wise and reduction kernels (coordinate-descent tuning): faster steps for minutes of
            compilation on the first step (Inductor caches the results on the machine, so later runs
            start faster). Worth it for long runs; the measured gain and cost are in docs/speed.md.
        activation_checkpointing: recompute each block's activations (and tangents) in backward:
            less memory for about one more forward per step.
        checkpoint_blocks: with ``activation_checkpointing``, recompute only the first this many
            blocks (``None``: all): memory and recompute both scale with the number, so pick the
            smallest that fits (``fewstep bench step --checkpointing --set train.checkpoint_blocks=N``).
        cpu_threads: PyTorch threads of a CPU run; ``None`` (auto) honours ``OMP_NUM_THREADS``, else takes
            the cores not busy with other work, split over this host's processes
            (:mod:`fewstep.train.resources`; why: docs/speed.md, "CPU threads"). GPU runs ignore it.
        trackers: experiment trackers that get the status records, the config and the sample grids
            (Accelerate's: ``tensorboard``, ``wandb``, …; :mod:`fewstep.train.trackers`); rank 0 only.
        tracker_project: the project name trackers file the run under (wandb's project).
        distributed: with several processes, ``ddp`` (every rank holds the model; Accelerate's DDP
            wraps the objective) or ``fsdp2`` (parameters, EMA tracks and teacher sharded over ranks
            with ``fully_shard``); see :mod:`fewstep.train.distributed` and docs/distributed.md.
        init_from: a run directory (its newest valid checkpoint) or a checkpoint directory whose
            weights start this run: the source's evaluation weights (its ``sample.weights``, an EMA
            track) are loaded into the backbone, its EMA tracks and teachers when the run starts from
            step 0, never when it resumes (:func:`fewstep.build.init_from_run`). The backbone's
            parameter names and shapes must match the source's; objective-owned extras (DMF's
            log-variance) keep their initialisation. ``fewstep train --init-from RUN`` sets it; e.g. a
            ``dmf`` run from an ``fm`` run of the same DiT (docs/design/frontier.md §7).
    """

    total_kimg: float = 10.0
    batch: int = 64
    batch_per_gpu: int | None = None
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine", "rsqrt"] = "constant"
    lr_warmup_kimg: float = 0.0
    lr_decay_kimg: float | None = None
    lr_min: float = 0.0
    grad_clip: float | None = None
    ema_betas: dict[str, float] = field(default_factory=lambda: {"ema": 0.9999})
    ema_halflife_kimg: dict[str, float] = field(default_factory=dict)
    ema_rampup_ratio: float | None = None
    ema_power_std: dict[str, float] = field(default_factory=dict)
    precision: Literal["bf16", "fp32"] = "bf16"
    allow_tf32: bool = False
    status_kimg: float = 1.0
    checkpoint_kimg: float = 0.0
    sample_kimg: float = 0.0
    keep_checkpoints: int = 3
    seed: int = 0
    max_bad_steps: int = 8
    max_minutes: float | None = None
    compile: bool = False
    compile_tuning: bool = False
    activation_checkpointing: bool = False
    checkpoint_blocks: int | None = None
    distributed: Literal["ddp", "fsdp2"] = "ddp"
    cpu_threads: int | None = None
    trackers: tuple[str, ...] = ()
    tracker_project: str = "fewstep"
    init_from: str | None = None

    def __post_init__(self) -> None:
        from fewstep.ema import MAX_POWER_STD

        names = [*self.ema_betas, *self.ema_halflife_kimg, *self.ema_power_std]
        twice = sorted({n for n in names if names.count(n) > 1})
        require([
            (self.max_minutes is None or self.max_minutes > 0,
             f"train.max_minutes must be > 0 (or none), got {self.max_minutes}"),
            (self.checkpoint_blocks is None or self.checkpoint_blocks >= 0,
             f"train.checkpoint_blocks must be ≥ 0 (or none: all), got {self.checkpoint_blocks}"),
            (self.lr_warmup_kimg >= 0, f"train.lr_warmup_kimg must be ≥ 0, got {self.lr_warmup_kimg}"),
            (self.lr_schedule != "rsqrt" or (self.lr_decay_kimg or 0) > 0,
             "train.lr_schedule=rsqrt needs train.lr_decay_kimg > 0: the kimg where the inverse square root decay "
             "starts (edm2: 70k batches of 2048, about 143360 kimg)"),
            (self.lr_decay_kimg is None or self.lr_decay_kimg > 0,
             f"train.lr_decay_kimg must be > 0 (or none), got {self.lr_decay_kimg}"),
            (not twice, f"EMA track {twice[0] if twice else ''!r} is defined twice (train.ema_betas, ema_halflife_kimg "
                        "and ema_power_std share one set of names)"),
            *[(0 <= beta < 1, f"train.ema_betas[{name!r}] must be a decay in [0, 1), got {beta}")
              for name, beta in self.ema_betas.items()],
            *[(h > 0, f"train.ema_halflife_kimg[{name!r}] must be > 0, got {h}") for name, h in self.ema_halflife_kimg.items()],
            (self.ema_rampup_ratio is None or self.ema_rampup_ratio > 0,
             f"train.ema_rampup_ratio must be > 0 (or none), got {self.ema_rampup_ratio}"),
            *[(0 < std < MAX_POWER_STD, f"train.ema_power_std[{name!r}] must be in (0, {MAX_POWER_STD:.4f}) (σ_rel of a "
                                        f"power-function EMA, e.g. 0.05 or 0.10), got {std}")
              for name, std in self.ema_power_std.items()],
        ])
        if self.trackers:
            from fewstep.train.trackers import known_trackers

            unknown = [name for name in self.trackers if name not in known_trackers()]
            if unknown:
                hint = closest(unknown[0], known_trackers())
                raise ConfigError(f"unknown tracker {unknown[0]!r} in train.trackers"
                                  + (f"; did you mean {hint[0]!r}?" if hint else "")
                                  + f" (valid: {', '.join(known_trackers())})")


@dataclass(kw_only=True)
class SampleConfig:
    """Sampling for grids during training and the ``sample`` command's defaults.

    Attributes:
        nfe: numbers of function evaluations to show, one grid block per value.
        num_images: images per grid block (seeds 0 … num_images−1).
        weights: ``online`` or the name of an EMA track in ``train.ema_betas``.
        guidance: CFG scale w at sampling (objectives with CFG at sampling); ``None`` = objective default.
    """

    nfe: tuple[int, ...] = (1, 4)
    num_images: int = 64
    weights: str = "ema"
    guidance: float | None = None


@dataclass(kw_only=True)
class RunConfig:
    """Everything needed to reproduce a run; saved as ``config.json`` in the run directory."""

    recipe: str
    objective: ObjectiveConfig
    backbone: BackboneConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ---------------------------------------------------------------------------------------------------
# Dict round trips
# ---------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def default_objective_config(name: str) -> ObjectiveConfig:
    """The default config of the objective registered as ``name``."""
    from fewstep.registry import objectives

    return objectives.get(name).Config(name=name)


def default_backbone_config(name: str, base: BackboneConfig | None = None) -> BackboneConfig:
    """The config of backbone flavour ``name``; switches of ``base`` are kept when it is the same family."""
    from fewstep.registry import backbones

    return backbones.get(name)(base)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :func:`to_dict` output; unknown keys are errors."""
    data = dict(data)
    for section in ("objective", "backbone"):
        if not isinstance(data.get(section), dict) or "name" not in data[section]:
            raise ConfigError(f"config section {section!r} must be a dict with a 'name'")
    objective = default_objective_config(data["objective"]["name"])
    backbone = default_backbone_config(data["backbone"]["name"])
    out = RunConfig(recipe=str(data.get("recipe", "?")), objective=objective, backbone=backbone)
    known = {f.name for f in fields(RunConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(_unknown(key, sorted(known), "run config"))
    for section in ("objective", "backbone", "data", "train", "sample"):
        if section in data:
            setattr(out, section, replace_fields(getattr(out, section), data[section], section))
    return out


def replace_fields(cfg: Any, values: dict[str, Any], where: str) -> Any:
    """A copy of dataclass ``cfg`` with ``values`` type-checked and replaced; unknown keys are errors."""
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in fields(cfg)]
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown(key, names, where))
        changes[key] = coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------------
# Overrides: "section.field=value"
# ---------------------------------------------------------------------------------------------------
def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.field=value`` strings; values are Python literals or bare strings.

    Examples: ``train.lr=2e-4``, ``train.betas=(0.9,0.99)``, ``backbone.qk_norm=false``,
    ``train.ema_betas={'ema':0.999}``, ``train.grad_clip=none``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        sections = [f.name for f in fields(RunConfig) if f.name != "recipe"]
        if len(parts) != 2 or parts[0] not in sections:
            hint = closest(parts[0], sections)
            raise ConfigError(f"override key {key!r} must be section.field with section one of "
                              f"{', '.join(sections)}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        section, name = parts
        sub = getattr(cfg, section)
        if name == "name" and section in ("objective", "backbone"):
            raise ConfigError(f"change the {section} with --{section}, not --set {section}.name")
        setattr(cfg, section, replace_fields(sub, {name: parse_literal(raw)}, section))
    return cfg


def parse_literal(raw: str) -> Any:
    """A Python literal if ``raw`` is one (``1e-4``, ``(1, 2)``, ``true``), else the string itself."""
    text = raw.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert ``value`` to ``annotation`` (int, float, bool, str, Optional, tuple, dict, Literal)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = (value,)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where} needs {len(args)} values, got {len(value)}: {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a dict, got {value!r}")
        return {coerce(k, args[0], where): coerce(v, args[1], where) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            return str(value)
        return value
    if annotation is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {annotation!r}")


def _unknown(key: str, names: list[str], where: str) -> str:
    hint = closest(key, names)
    msg = f"unknown key {key!r} in {where}"
    if hint:
        msg += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
    return msg + f" (valid: {', '.join(names)})"
