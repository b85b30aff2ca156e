"""From configs to modules: resolve a run config against its objective, build objectives, load runs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from fewstep.checkpoints import Checkpoint, CheckpointError, latest_checkpoint, verify_checkpoint
from fewstep.config import RunConfig, run_config_from_dict, to_dict
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


def build_objective(cfg: RunConfig, spec: DataSpec) -> Objective:
    """Build the backbone for ``spec`` and wrap it in the configured objective (with EMA tracks)."""
    cls = objectives.get(cfg.objective.name)
    if not isinstance(cfg.objective, cls.Config):
        raise TypeError(f"objective {cfg.objective.name!r} needs a {cls.Config.__name__}, "
                        f"got {type(cfg.objective).__name__}")
    backbone = cfg.backbone.build(spec)
    return cls(backbone, cfg.objective, num_classes=spec.num_classes, ema_betas=cfg.train.ema_betas)


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
    state = ckpt.tensors("objective.safetensors")
    missing, unexpected = objective.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {ckpt.path} does not match its config: missing "
                              f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    return objective.eval(), cfg, ckpt


def write_run_config(run_dir: Path, cfg: RunConfig, spec: DataSpec) -> None:
    """Write ``config.json`` (resolved config + data spec) before step 0."""
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"config": to_dict(cfg), "data_spec": dataclasses.asdict(spec)}
    tmp = run_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, run_dir / "config.json")
