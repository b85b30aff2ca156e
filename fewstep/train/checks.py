"""Everything checked before any compute: config types and ranges, the batch layout, and whether a run
directory (its ``config.json`` and newest checkpoint) may be continued with a config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from fewstep.build import check_compatible
from fewstep.checkpoints import Checkpoint, latest_checkpoint, verify_checkpoint
from fewstep.config import ConfigError, RunConfig, run_config_from_dict, to_dict
from fewstep.contracts import DataSpec

# Fields that may change between a run and its resumption (length and bookkeeping only).
RESUMABLE_CHANGES = {"train.total_kimg", "train.status_kimg", "train.checkpoint_kimg", "train.sample_kimg",
                     "train.keep_checkpoints", "train.max_bad_steps", "train.max_minutes", "train.compile",
                     "train.compile_tuning", "train.activation_checkpointing", "train.checkpoint_blocks",
                     "train.distributed", "data.num_workers", "data.root", "sample.nfe", "sample.num_images",
                     "sample.weights", "sample.guidance", "train.trackers", "train.tracker_project"}


@dataclass
class Layout:
    """How the global batch splits: ``batch = world × batch_per_gpu × accumulation``."""

    world: int
    batch_per_gpu: int
    accumulation: int


def plan_batches(cfg: RunConfig, world: int) -> Layout:
    """Check that the global batch splits over devices × accumulation rounds; fail with the numbers."""
    t = cfg.train
    if t.batch < 1:
        raise ConfigError(f"train.batch must be ≥ 1, got {t.batch}")
    per_gpu = t.batch_per_gpu or t.batch // world
    if per_gpu < 1 or t.batch % (world * per_gpu):
        raise ConfigError(f"train.batch={t.batch} must be divisible by devices ({world}) × "
                          f"train.batch_per_gpu ({t.batch_per_gpu or 'auto'}); try a batch that is a multiple "
                          f"of {world * max(per_gpu, 1)}")
    return Layout(world, per_gpu, t.batch // (world * per_gpu))


def check_config(cfg: RunConfig) -> None:
    """Types and ranges of a config, also one built in Python (CLI overrides are checked when parsed)."""
    try:
        data = to_dict(cfg)
    except TypeError as exc:
        raise ConfigError(f"the config holds a value that is not a plain number, string, list or dict: {exc}") from exc
    run_config_from_dict(data)   # type-checks every field against its dataclass
    t = cfg.train
    for name in ("status_kimg", "checkpoint_kimg", "sample_kimg"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be ≥ 0, got {getattr(t, name)}")
    if not t.total_kimg > 0:
        raise ConfigError(f"train.total_kimg must be > 0, got {t.total_kimg}")
    if t.checkpoint_blocks is not None and not t.activation_checkpointing:
        raise ConfigError("train.checkpoint_blocks chooses how many blocks activation checkpointing recomputes; "
                          "set train.activation_checkpointing=true with it")
    if t.compile_tuning and not t.compile:
        raise ConfigError("train.compile_tuning tunes the kernels torch.compile generates; set train.compile=true "
                          "with it")
    if t.max_bad_steps < 1 or t.keep_checkpoints < 0:
        raise ConfigError(f"train.max_bad_steps must be ≥ 1 and train.keep_checkpoints ≥ 0, got "
                          f"{t.max_bad_steps} and {t.keep_checkpoints}")


def find_resume(run_dir: Path, cfg: RunConfig, spec: DataSpec, accelerator: Accelerator,
                 notes: list[str]) -> Checkpoint | None:
    """Check the run directory against ``cfg`` and pick the checkpoint to resume (the same on all ranks)."""
    name = None
    if accelerator.is_main_process:
        saved = run_dir / "config.json"
        if saved.exists():
            body = json.loads(saved.read_text())
            check_compatible(body["config"], body.get("data_spec"), cfg, spec, str(run_dir), RESUMABLE_CHANGES)
        ckpt = latest_checkpoint(run_dir, report=notes.append)
        if ckpt is not None:
            check_compatible(ckpt.manifest["config"], ckpt.manifest.get("data_spec"), cfg, spec,
                             f"checkpoint {ckpt.path}", RESUMABLE_CHANGES)
            name = ckpt.path.name
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        name = broadcast_object_list([name])[0]
    if name is None:
        return None
    return ckpt if accelerator.is_main_process else verify_checkpoint(run_dir / name, hashes=False)
