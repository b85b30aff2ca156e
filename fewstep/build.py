"""From configs to modules: resolve a run config against its objective, build objectives, load runs."""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch

from fewstep.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, verify_checkpoint
from fewstep.config import (ConfigError, RunConfig, apply_overrides, default_backbone_config, run_config_from_dict,
                            to_dict)
from fewstep.contracts import DataSpec, Objective
from fewstep.files import write_json
from fewstep.registry import objectives, recipes


def resolve(cfg: RunConfig) -> RunConfig:
    """Give the backbone exactly the conditioning the objective feeds (``needs_for(config)``): a gap
    embedder iff it makes two-time calls, a guidance embedder iff it feeds a guidance input, and its
    ``time_mode``, extra ``conditions`` and auxiliary head (docs/design/frontier.md §1). (An embedder
    that is never fed would get no gradient, which DDP rejects, and would make checkpoints of different
    objectives differ for nothing.) The saved config is the resolved one, so it states exactly what was
    trained. A backbone without one of these switches is refused when the objective needs it.
    """
    needs = objectives.get(cfg.objective.name).needs_for(cfg.objective)
    wanted = {"gap_embedder": needs.time_inputs == 2, "guidance_embedder": needs.guidance_input,
              "time_mode": needs.time_mode, "conditions": tuple(needs.conditions), "aux_head": needs.aux_head}
    plain = {"gap_embedder": False, "guidance_embedder": False, "time_mode": "t+h", "conditions": (), "aux_head": False}
    lacking = [k for k, v in wanted.items() if not hasattr(cfg.backbone, k) and v != plain[k]]
    if lacking:
        raise ConfigError(f"objective {cfg.objective.name!r} needs the backbone switches "
                          f"{', '.join(f'{k}={wanted[k]!r}' for k in lacking)}, which backbone {cfg.backbone.name!r} "
                          f"({type(cfg.backbone).__name__}) does not have; use a DiT (dit-*) or the mlp")
    changes = {k: v for k, v in wanted.items() if hasattr(cfg.backbone, k) and getattr(cfg.backbone, k) != v}
    if changes:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, **changes))
    return cfg


def build_config(recipe: str, objective: str | None, backbone: str | None, data: str | None,
                 kimg: float | None, batch: int | None, overrides: list[str], lr: float | None = None,
                 seed: int | None = None) -> RunConfig:
    """Recipe → config with the CLI's choices and ``--set`` overrides applied (no compute)."""
    make = recipes.get(recipe)
    cfg: RunConfig = make(objective) if objective else make()
    if backbone:
        cfg.backbone = default_backbone_config(backbone, cfg.backbone)
    if data:
        cfg.data.name = data
    if kimg is not None:
        cfg.train.total_kimg = kimg
    if batch is not None:
        cfg.train.batch = batch
    if lr is not None:
        cfg.train.lr = lr
    if seed is not None:
        cfg.train.seed = seed
    return apply_overrides(cfg, overrides)


def build_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, cuda: bool) -> torch.optim.AdamW:
    """The trainer's AdamW over ``params`` (``train.lr``, ``betas``, ``eps``, ``weight_decay``), fused on CUDA."""
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
                             fused=cuda or None)


def build_objective(cfg: RunConfig, spec: DataSpec) -> Objective:
    """Build the backbone for ``spec`` and wrap it in the configured objective (with EMA tracks)."""
    cls = objectives.get(cfg.objective.name)
    if not isinstance(cfg.objective, cls.Config):
        raise TypeError(f"objective {cfg.objective.name!r} needs a {cls.Config.__name__}, "
                        f"got {type(cfg.objective).__name__}")
    backbone = cfg.backbone.build(spec)
    from fewstep.ema import ema_tracks

    return cls(backbone, cfg.objective, num_classes=spec.num_classes, ema_betas=ema_tracks(cfg.train))


def init_from_run(objective: Objective, source: str | os.PathLike) -> str:
    """Start ``objective`` from another run's evaluation weights (``train.init_from``; docs/design/frontier.md §7).

    The source's ``sample.weights`` track (an EMA, or ``online``) is loaded into ``objective.backbone``
    and copied into its EMA tracks and teachers, so every copy starts from the same weights; anything
    else the objective owns (DMF's log-variance) keeps its initialisation.

    Args:
        objective: a freshly built objective (before its first step).
        source: a run directory (its newest valid checkpoint is used) or one checkpoint directory.
    Returns:
        What was loaded, for the log: ``"<weights> weights of <checkpoint> (step N, K kimg)"``.
    Raises:
        CheckpointError: the source has no valid checkpoint, lacks the weights, or its backbone's
            parameter names or shapes differ from this one's (one line naming the first differences).
    """
    ckpt = find_checkpoint(source)
    weights = run_config_from_dict(ckpt.field("config")).sample.weights
    prefix = "backbone." if weights == "online" else f"ema.{weights}."
    state = {k[len(prefix):]: v for k, v in ckpt.tensors("objective.safetensors").items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"init_from {source}: checkpoint {ckpt.path} has no {weights!r} weights "
                              f"(no tensors under {prefix!r})")
    differences = state_mismatch(objective.backbone.state_dict(), state, ("missing in the source", "missing here",
                                                                          "shape (source vs here)"))
    if differences:
        raise CheckpointError(f"init_from {source}: the source backbone does not fit this one ({differences}); "
                              f"start from a run of the same backbone (flavour, width, patch, classes and "
                              f"embedders; a dmf run converts an fm run of the same DiT)")
    copies = [objective.backbone, *objective.ema.values(), *(m for m, _ in objective.teacher_tracks())]
    for module in copies:
        module.load_state_dict(state)
    return f"{weights} weights of {ckpt.path} (step {ckpt.step}, {float(ckpt.manifest['kimg']):g} kimg)"


def training_flops_per_image(objective: Objective) -> float | None:
    """Model FLOPs of training on one image: the objective's ``flops_per_sample`` of one backbone forward
    (the backbone's ``forward_flops(1)``); ``None`` for backbones that do not count their FLOPs."""
    forward_flops = getattr(objective.backbone, "forward_flops", None)
    return objective.flops_per_sample(forward_flops(1)) if forward_flops else None


def spec_from_dict(data: dict) -> DataSpec:
    return DataSpec(**data)


def find_checkpoint(run: str | os.PathLike) -> Checkpoint:
    """A run directory's newest valid checkpoint, or the checkpoint directory itself."""
    run = Path(run)
    if not run.exists():
        raise FileNotFoundError(f"no such run or checkpoint directory: {run}")
    if (run / "manifest.json").exists():
        return verify_checkpoint(run)
    skipped: list[str] = []
    ckpt = latest_checkpoint(run, report=skipped.append)
    if ckpt is None:
        why = f": {'; '.join(m.removeprefix('skipping checkpoint: ') for m in skipped)}" if skipped else ""
        raise CheckpointError(f"{run} holds no valid checkpoint (expected checkpoint-*/manifest.json){why}")
    for message in skipped:
        warnings.warn(message, stacklevel=2)
    return ckpt


def load_objective(run: str | os.PathLike, device: torch.device | str = "cpu", weights: str | None = None
                   ) -> tuple[Objective, RunConfig, Checkpoint]:
    """Rebuild an objective from a run directory, a checkpoint directory or an exported model.

    Args:
        run: run directory (newest valid checkpoint is used), one checkpoint directory, or a model
            written by ``fewstep export`` (:mod:`fewstep.export`).
        device: where to put the weights.
        weights: the weights the caller will sample with; only checked for exported models, which hold
            one set (``None``: theirs).
    Returns:
        (objective, its run config, the checkpoint read; for an exported model its ``config.json`` as
        the manifest).
    """
    from fewstep.export import is_exported, load_exported

    if is_exported(run):
        return load_exported(run, device=device, weights=weights)
    ckpt = find_checkpoint(run)
    cfg = run_config_from_dict(ckpt.field("config"))
    spec = spec_from_dict(ckpt.field("data_spec"))
    with torch.device("meta"):
        objective = build_objective(cfg, spec)
    objective = objective.to_empty(device=device)
    load_state(objective, ckpt, "its own config")
    return objective.eval(), cfg, ckpt


# ---------------------------------------------------------------------------------------------------
# Compatibility of a run directory or checkpoint with a config
# ---------------------------------------------------------------------------------------------------
def load_state(objective: Objective, ckpt: Checkpoint, what: str = "the configured model") -> None:
    """Load ``ckpt``'s objective tensors into ``objective``; any missing, unexpected or mis-shaped
    tensor is a :class:`CheckpointError` naming the checkpoint and the first offending keys."""
    state = ckpt.tensors("objective.safetensors")
    differences = state_mismatch(objective.state_dict(), state)
    if differences:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match {what}: {differences}")
    objective.load_state_dict(state)


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   names: tuple[str, str, str] = ("missing", "unexpected", "shape")) -> str:
    """How ``state`` fails to fit a module whose state dict is ``own``, ``""`` when it fits: under ``names``,
    the first keys ``own`` has and ``state`` lacks, those only ``state`` has, and those whose shapes differ
    (``state``'s vs ``own``'s)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    return "; ".join(f"{name} {items[:4]}{'…' if len(items) > 4 else ''}"
                     for name, items in zip(names, (missing, unexpected, shapes)) if items)


# Config fields whose value is a dict (EMA tracks by name): compared as one value.
DICT_FIELDS = frozenset({"ema_betas", "ema_halflife_kimg", "ema_power_std"})


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (the EMA track dicts stay one value each)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in DICT_FIELDS:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict, allowed: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``key: old → new`` for every flattened config key (not in ``allowed``) whose value differs."""
    a, b = flatten_config(old), flatten_config(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in allowed)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys]


def with_defaults(saved: dict) -> dict:
    """A saved config dict with the fields it predates filled in with their defaults (a run from before
    ``train.lr_schedule`` existed ran with the constant schedule), so older runs still compare equal."""
    try:
        return to_dict(run_config_from_dict(saved))
    except (ConfigError, LookupError, TypeError):   # not a config this version can read: compare as it is
        return saved


def check_compatible(saved: dict, saved_spec: dict | None, cfg: RunConfig, spec: DataSpec, where: str,
                     allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse to continue ``saved`` (a config dict from ``config.json`` or a checkpoint manifest) with
    ``cfg``/``spec`` when anything but the ``allowed`` keys differs; the error lists the differences.
    A field the saved config lacks (added to fewstep after the run started) counts as its default
    (:func:`with_defaults`), which by design is the behaviour from before the field existed."""
    changes = config_changes(with_defaults(saved), to_dict(cfg), allowed)
    if saved_spec is not None:
        own = dataclasses.asdict(spec)
        changes += [f"data_spec.{k}: {saved_spec.get(k)!r} → {own.get(k)!r}"
                    for k in sorted(own) if saved_spec.get(k) != own.get(k)]
    if changes:
        more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
        raise ConfigError(f"{where} belongs to a run with a different config ({', '.join(changes[:6])}{more}); "
                          f"use another --out directory, or the same settings to resume it")


def write_run_config(run_dir: Path, cfg: RunConfig, spec: DataSpec) -> None:
    """Write ``config.json`` (resolved config + data spec) before step 0."""
    write_json(run_dir / "config.json", {"config": to_dict(cfg), "data_spec": dataclasses.asdict(spec)})
