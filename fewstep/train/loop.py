"""The training loop, through HF Accelerate.

Accelerate prepares the *objective* (which owns the backbone), so every JVP runs inside the DDP/FSDP
forward. Durations and intervals are in kimg; gradient accumulation only splits the global batch and
never changes the experiment. The resolved config is written before step 0; checkpoints hold weights,
EMAs, optimizer, RNG states and the data position, so a resumed run continues the same stream.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from fewstep import __version__
from fewstep.build import build_objective, resolve, write_run_config
from fewstep.checkpoints import latest_checkpoint, load_optimizer_state, save_checkpoint
from fewstep.config import ConfigError, RunConfig, to_dict
from fewstep.contracts import DataSpec
from fewstep.data import load_dataset
from fewstep.data.loader import BatchStream
from fewstep.images import make_grid, to_uint8, write_png
from fewstep.sample import sample
from fewstep.train.status import StatusLog, peak_flops

# Fields that may change between a run and its resumption (length and bookkeeping only).
RESUMABLE_CHANGES = {"train.total_kimg", "train.status_kimg", "train.checkpoint_kimg", "train.sample_kimg",
                     "train.keep_checkpoints", "data.num_workers", "data.root", "sample.nfe",
                     "sample.num_images", "sample.weights", "sample.guidance"}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before the bad update was applied."""


@dataclass
class TrainResult:
    """Where a finished (or stopped) run stands."""

    run_dir: Path
    step: int
    kimg: float
    loss: float | None
    checkpoint: Path | None


@dataclass
class _Layout:
    world: int
    batch_per_gpu: int
    accumulation: int


def plan_batches(cfg: RunConfig, world: int) -> _Layout:
    """Check that the global batch splits over devices × accumulation rounds; fail with the numbers."""
    t = cfg.train
    if t.batch < 1:
        raise ConfigError(f"train.batch must be ≥ 1, got {t.batch}")
    per_gpu = t.batch_per_gpu or t.batch // world
    if per_gpu < 1 or t.batch % (world * per_gpu):
        raise ConfigError(f"train.batch={t.batch} must be divisible by devices ({world}) × "
                          f"train.batch_per_gpu ({t.batch_per_gpu or 'auto'}); try a batch that is a multiple "
                          f"of {world * max(per_gpu, 1)}")
    return _Layout(world, per_gpu, t.batch // (world * per_gpu))


def _next(nimg: int, interval: float) -> float:
    """The first multiple of ``interval`` images after ``nimg`` (∞ when the interval is 0)."""
    return (math.floor(nimg / interval) + 1) * interval if interval > 0 else math.inf


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / "config.json"
    if not path.exists():
        return
    old = _flatten(json.loads(path.read_text())["config"])
    new = _flatten(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(f"{run_dir} already holds a run with a different config ({diff}); "
                          f"use another --out directory, or the same settings to resume it")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "ema_betas":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def train(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> TrainResult:
    """Train ``cfg`` in ``run_dir``, resuming from its newest valid checkpoint if there is one."""
    run_dir = Path(run_dir)
    cfg = resolve(cfg)
    t = cfg.train
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda,
                              mixed_precision="bf16" if (cuda and t.precision == "bf16") else "no")
    device, rank = accelerator.device, accelerator.process_index
    layout = plan_batches(cfg, accelerator.num_processes)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32

    dataset = load_dataset(cfg.data)
    spec: DataSpec = dataset.spec
    if accelerator.is_main_process:
        _check_resumable(run_dir, cfg)
        write_run_config(run_dir, cfg, spec)
    accelerator.wait_for_everyone()

    torch.manual_seed(t.seed * 1000 + rank)
    objective = build_objective(cfg, spec).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    generator = torch.Generator(device).manual_seed(t.seed * 1000 + rank)

    step, nimg, position = 0, 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        objective.load_state_dict(ckpt.tensors("objective.safetensors"))
        opt_state = load_optimizer_state(ckpt)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        step, nimg, position = ckpt.step, int(ckpt.manifest["nimg"]), int(ckpt.manifest["data_position"])
        rng_file = ckpt.path / f"rng-rank{rank}.safetensors"
        if rng_file.exists():
            rng = ckpt.tensors(rng_file.name)
            torch.set_rng_state(rng["cpu"])
            generator.set_state(rng["objective"].to(generator.get_state().device))
            if cuda and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)

    model, optimizer = accelerator.prepare(objective, optimizer)
    stream = BatchStream(dataset, layout.batch_per_gpu, seed=t.seed, rank=rank, world_size=layout.world,
                         num_workers=cfg.data.num_workers, device=device, start_position=position)
    batches = iter(stream)
    total_nimg = int(round(t.total_kimg * 1000))
    status = StatusLog(run_dir, t.total_kimg, nimg / 1000, enabled=accelerator.is_main_process,
                       show_progress=show_progress)
    if ckpt is not None:
        status.print(f"resumed from {ckpt.path.name} at {nimg / 1000:.1f} kimg")
    fwd_flops = getattr(objective.backbone, "forward_flops", None)
    flops_per_img = objective.flops_per_sample(fwd_flops(1)) if fwd_flops else None
    peak = peak_flops(device)

    def save() -> Path | None:
        rng = {"cpu": torch.get_rng_state(), "objective": generator.get_state()}
        if cuda:
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = accelerator.gather_for_metrics([rng], use_gather_object=True) if layout.world > 1 else [rng]
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(
                run_dir, step, objective_state=accelerator.unwrap_model(model).state_dict(),
                optimizer_state=optimizer.state_dict(), rng_states=rngs, keep=t.keep_checkpoints,
                manifest={"nimg": nimg, "kimg": nimg / 1000, "data_position": stream.position,
                          "config": to_dict(cfg), "data_spec": dataclasses.asdict(spec),
                          "fewstep_version": __version__, "torch_version": torch.__version__})
        accelerator.wait_for_everyone()
        return path

    def grid(tag: str) -> None:
        if not accelerator.is_main_process:
            return
        obj = accelerator.unwrap_model(model)
        seeds = list(range(cfg.sample.num_images))
        blocks = [to_uint8(sample(obj, seeds, nfe, weights=cfg.sample.weights, guidance=cfg.sample.guidance,
                                  autocast=cuda and t.precision == "bf16").images) for nfe in cfg.sample.nfe]
        write_png(run_dir / "samples" / f"{tag}.png", make_grid(blocks))

    interval = {"status": t.status_kimg * 1000, "checkpoint": t.checkpoint_kimg * 1000, "sample": t.sample_kimg * 1000}
    next_at = {k: _next(nimg, v) for k, v in interval.items()}
    sums: dict[str, torch.Tensor] = {}
    ticks, tick_start, tick_nimg = 0, time.time(), nimg
    last_loss, last_ckpt = None, None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while nimg < total_nimg:
            model.train()
            for micro in range(layout.accumulation):
                x, y = next(batches)
                y = y if spec.num_classes else None
                sync = micro == layout.accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    out = model(x, y, generator, nimg)
                    if not torch.isfinite(out.loss):
                        bad = {k: float(v) for k, v in out.logs.items()}
                        raise NonFiniteLossError(
                            f"loss is {out.loss.item()} at step {step} ({nimg / 1000:.2f} kimg); terms {bad}. "
                            f"The update was not applied; the newest checkpoint in {run_dir} is intact.")
                    accelerator.backward(out.loss / layout.accumulation)
                for k, v in {"loss": out.loss, **out.logs}.items():
                    v = torch.as_tensor(v, device=device).detach().float()
                    sums[k] = sums.get(k, 0) + v / layout.accumulation
            if t.grad_clip is not None:
                accelerator.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            accelerator.unwrap_model(model).after_step()
            step, ticks, nimg = step + 1, ticks + 1, nimg + t.batch
            done = nimg >= total_nimg
            if nimg >= next_at["status"] or done:
                elapsed = time.time() - tick_start
                record = {"step": step, "kimg": nimg / 1000,
                          **{k: float(accelerator.reduce(v, "mean")) / ticks for k, v in sums.items()},
                          "img_per_s": (nimg - tick_nimg) / max(elapsed, 1e-9),
                          "sec_per_kimg": elapsed / max((nimg - tick_nimg) / 1000, 1e-9), "time": time.time()}
                if flops_per_img:
                    record["tflops"] = flops_per_img * record["img_per_s"] / layout.world / 1e12
                    if peak:
                        record["mfu"] = record["tflops"] * 1e12 / peak
                if cuda:
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                last_loss = record["loss"]
                status.report(record)
                sums, ticks, tick_start, tick_nimg = {}, 0, time.time(), nimg
                next_at["status"] = _next(nimg, interval["status"])
            if nimg >= next_at["sample"] and not done and spec.kind != "points":
                grid(f"kimg{nimg / 1000:08.1f}")
                next_at["sample"] = _next(nimg, interval["sample"])
            if nimg >= next_at["checkpoint"] and not done:
                last_ckpt = save()
                next_at["checkpoint"] = _next(nimg, interval["checkpoint"])
        if ckpt is None or step > ckpt.step:
            last_ckpt = save()
        if spec.kind == "points":   # toy data: metrics.json (sliced Wasserstein per NFE) and a scatter plot
            if accelerator.is_main_process:
                from fewstep.evaluate import evaluate_points

                held_out = load_dataset(dataclasses.replace(cfg.data, split="test"))
                evaluate_points(accelerator.unwrap_model(model), held_out, run_dir, nfes=cfg.sample.nfe,
                                num=cfg.sample.num_images, weights=cfg.sample.weights,
                                guidance=cfg.sample.guidance)
        else:
            grid("final")
    finally:
        status.close()
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, step=step, kimg=nimg / 1000, loss=last_loss,
                       checkpoint=last_ckpt or (ckpt.path if ckpt else None))
