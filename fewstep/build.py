"""From configs to modules: resolve a run config against its objective, build objectives, load runs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from fewstep.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, verify_checkpoint
from fewstep.config import ConfigError, RunConfig, run_config_from_dict, to_dict
from fewstep.contracts import DataSpec, Objective
from fewstep.registry import objectives


def resolve(cfg: RunConfig) -> RunConfig:
    """Give the backbone exactly the embedders the objective feeds: a gap embedder iff it makes two-time
    calls, a guidance embedder iff it feeds a guidance input. (An embedder that is never fed would get
    no gradient, which DDP rejects, and would make checkpoints of different objectives differ for
    nothing.) The saved config is the resolved one, so it states exactly what was trained.
    """
    needs = objectives.get(cfg.objective.name).needs
    wanted = {"gap_embedder": needs.time_inputs == 2, "guidance_embedder": needs.guidance_input}
    changes = {k: v for k, v in wanted.items() if hasattr(cfg.backbone, k) and getattr(cfg.backbone, k) != v}
    if changes:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, **changes))
    return cfg


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
    return cls(backbone, cfg.objective, num_classes=spec.num_classes, ema_betas=cfg.train.ema_betas)


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
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(f"{run} holds no valid checkpoint (expected checkpoint-*/manifest.json)")
    return ckpt


def load_objective(run: str | os.PathLike, device: torch.device | str = "cpu"
                   ) -> tuple[Objective, RunConfig, Checkpoint]:
    """Rebuild an objective from a run or checkpoint directory.

    Args:
        run: run directory (newest valid checkpoint is used) or one checkpoint directory.
        device: where to put the weights.
    Returns:
        (objective, its run config, the checkpoint read).
    """
    ckpt = find_checkpoint(run)
    cfg = run_config_from_dict(ckpt.manifest["config"])
    spec = spec_from_dict(ckpt.manifest["data_spec"])
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
    own = objective.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{name} {items[:4]}{'…' if len(items) > 4 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise CheckpointError(f"checkpoint {ckpt.path} does not match {what}: {'; '.join(parts)}")
    objective.load_state_dict(state)


def flatten_config(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (``ema_betas`` stays one value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "ema_betas":
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict, allowed: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``key: old → new`` for every flattened config key (not in ``allowed``) whose value differs."""
    a, b = flatten_config(old), flatten_config(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in allowed)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys]


def check_compatible(saved: dict, saved_spec: dict | None, cfg: RunConfig, spec: DataSpec, where: str,
                     allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse to continue ``saved`` (a config dict from ``config.json`` or a checkpoint manifest) with
    ``cfg``/``spec`` when anything but the ``allowed`` keys differs; the error lists the differences."""
    changes = config_changes(saved, to_dict(cfg), allowed)
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
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"config": to_dict(cfg), "data_spec": dataclasses.asdict(spec)}
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, run_dir / "config.json")
