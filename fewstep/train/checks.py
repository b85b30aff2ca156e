"""Everything checked before any compute: config types and ranges, the batch layout, and whether a run
directory (its ``config.json`` and newest checkpoint) may be continued with a config."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from fewstep.build import check_compatible, config_changes
from fewstep.checkpoints import Checkpoint, latest_checkpoint, list_checkpoints, move_aside, verify_checkpoint
from fewstep.config import ConfigError, RunConfig, require, run_config_from_dict, to_dict
from fewstep.contracts import DataSpec
from fewstep.data.base import check_data_config

# Fields that may change between a run and its resumption (length and bookkeeping only).
RESUMABLE_CHANGES = {"train.total_kimg", "train.status_kimg", "train.checkpoint_kimg", "train.sample_kimg",
                     "train.keep_checkpoints", "train.max_bad_steps", "train.max_minutes", "train.compile",
                     "train.compile_tuning", "train.activation_checkpointing", "train.checkpoint_blocks",
                     "train.distributed", "train.batch_per_gpu", "train.cpu_threads", "data.num_workers", "data.root", "sample.nfe",
                     "sample.num_images", "sample.weights", "sample.guidance", "train.trackers", "train.tracker_project"}


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
    """Types and ranges of a config, also one built in Python (CLI overrides are checked when parsed), and
    its data section (names, paths): everything about the input that can be checked without compute."""
    try:
        data = to_dict(cfg)
    except TypeError as exc:
        raise ConfigError(f"the config holds a value that is not a plain number, string, list or dict: {exc}") from exc
    run_config_from_dict(data)   # type-checks every field against its dataclass
    t, s = cfg.train, cfg.sample
    problems = [
        (t.total_kimg > 0, f"train.total_kimg must be > 0, got {t.total_kimg}"),
        (t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a finite number > 0, got {t.lr}"),
        (all(0 <= b < 1 for b in t.betas), f"train.betas must both be in [0, 1), got {t.betas}"),
        (t.eps > 0, f"train.eps must be > 0, got {t.eps}"),
        (t.weight_decay >= 0, f"train.weight_decay must be ≥ 0, got {t.weight_decay}"),
        (t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be > 0 (or none: no clipping), got {t.grad_clip}"),
        (t.batch_per_gpu is None or t.batch_per_gpu >= 1, f"train.batch_per_gpu must be ≥ 1 (or none), got {t.batch_per_gpu}"),
        (t.max_bad_steps >= 1, f"train.max_bad_steps must be ≥ 1, got {t.max_bad_steps}"),
        (t.keep_checkpoints >= 0, f"train.keep_checkpoints must be ≥ 0 (0 keeps all), got {t.keep_checkpoints}"),
        (t.cpu_threads is None or t.cpu_threads >= 1, f"train.cpu_threads must be ≥ 1 (or none: auto), got {t.cpu_threads}"),
        *[(getattr(t, name) >= 0, f"train.{name} must be ≥ 0, got {getattr(t, name)}")
          for name in ("status_kimg", "checkpoint_kimg", "sample_kimg")],
        (len(s.nfe) > 0 and all(n >= 1 for n in s.nfe), f"sample.nfe must be ≥ 1 jumps each, got {list(s.nfe)}"),
        (s.num_images >= 1, f"sample.num_images must be ≥ 1, got {s.num_images}"),
        (s.weights == "online" or s.weights in t.ema_betas,
         f"sample.weights must be 'online' or an EMA track of train.ema_betas ({', '.join(t.ema_betas) or 'none'}), "
         f"got {s.weights!r}"),
        (t.checkpoint_blocks is None or t.activation_checkpointing,
         "train.checkpoint_blocks chooses how many blocks activation checkpointing recomputes; set "
         "train.activation_checkpointing=true with it"),
        (not t.compile_tuning or t.compile,
         "train.compile_tuning tunes the kernels torch.compile generates; set train.compile=true with it"),
    ]
    require(problems)
    check_data_config(cfg.data)


def preflight(cfg: RunConfig, world: int) -> Layout:
    """Everything ``fewstep train`` checks before any compute, ``--dry-run`` included: the config
    (:func:`check_config`) and the batch layout over ``world`` processes (:func:`plan_batches`)."""
    check_config(cfg)
    return plan_batches(cfg, world)


def find_resume(run_dir: Path, cfg: RunConfig, spec: DataSpec, accelerator: Accelerator, notes: list[tuple[str, str]],
                restart: bool = False) -> Checkpoint | None:
    """Check the run directory against ``cfg`` and pick the checkpoint to resume (the same on all ranks);
    what the trainer should log goes to ``notes`` as (event name, message).

    * A newest checkpoint that is broken is skipped (reported in ``notes``) for the one before it.
    * If every checkpoint is broken, the run is refused: they stay for inspection, and ``restart``
      (``--restart``) moves them aside (:func:`move_aside`) to train from step 0.
    * A run directory without any checkpoint (a run that failed before its first save) takes the new
      config, whatever its ``config.json`` says; with checkpoints, only :data:`RESUMABLE_CHANGES` may differ.
    * ``restart`` moves the checkpoints, ``log.jsonl``, ``metrics.json`` and ``samples/`` of the run
      directory aside, whatever their state, and starts over (the config may change).
    """
    name = None
    if accelerator.is_main_process:
        paths = list_checkpoints(run_dir)
        skipped: list[str] = []
        ckpt = latest_checkpoint(run_dir, report=skipped.append)
        if restart and (paths or (run_dir / "log.jsonl").exists()):
            old = [p for p in [*paths, *(run_dir / n for n in ("log.jsonl", "metrics.json", "samples", "config.json"))]
                   if p.exists()]
            folder = move_aside(run_dir, old, "restarted")
            notes.append(("restarted", f"--restart: moved {len(paths)} checkpoint(s) and the run's log, samples and "
                                       f"config into {folder}"))
            ckpt, skipped = None, []
        elif paths and ckpt is None:
            raise ConfigError(
                f"every checkpoint in {run_dir} is broken ({'; '.join(_reason(m, run_dir) for m in reversed(skipped))}); "
                f"they are kept "
                f"for inspection. To train from step 0 in this directory, rerun with --restart (it moves them, "
                f"log.jsonl and samples/ into {run_dir}/restarted-<time>/, deleting nothing), or use another --out")
        notes.extend(("checkpoint_skipped", m) for m in skipped)
        saved = run_dir / "config.json"
        if saved.exists():
            body = _read_config(saved)
            if ckpt is None:   # nothing trained yet: a corrected config may replace the one that failed
                changes = config_changes(body["config"], to_dict(cfg), RESUMABLE_CHANGES)
                if changes:
                    notes.append(("config_replaced", f"{run_dir} has no checkpoint yet, so its config.json is replaced "
                                  f"by this one ({'; '.join(changes[:6])}{' …' if len(changes) > 6 else ''})"))
            else:
                check_compatible(body["config"], body.get("data_spec"), cfg, spec, str(run_dir), RESUMABLE_CHANGES)
        if ckpt is not None:
            check_compatible(ckpt.field("config"), ckpt.manifest.get("data_spec"), cfg, spec,
                             f"checkpoint {ckpt.path}", RESUMABLE_CHANGES)
            name = ckpt.path.name
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        name = broadcast_object_list([name])[0]
    if name is None:
        return None
    return ckpt if accelerator.is_main_process else verify_checkpoint(run_dir / name, hashes=False)


def _reason(message: str, run_dir: Path) -> str:
    """A skipped checkpoint's report without the run directory: ``checkpoint-00000002/objective.safetensors
    is truncated …``."""
    return (message.removeprefix("skipping checkpoint: ").replace(f"{run_dir}/", "")
            .removeprefix("checkpoint file ").removeprefix("checkpoint "))


def _read_config(path: Path) -> dict:
    """A run's ``config.json``: a dict with a ``config`` section, or one line naming the file."""
    try:
        body = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore it from a checkpoint's manifest.json, or "
                          f"move it away to start this run directory afresh") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
        raise ConfigError(f"{path} is not a fewstep run config (no 'config' section); restore it from a "
                          f"checkpoint's manifest.json, or move it away to start this run directory afresh")
    return body
