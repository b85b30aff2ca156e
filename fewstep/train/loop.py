"""The training loop, through HF Accelerate.

Accelerate prepares the *objective* (which owns the backbone), so every JVP runs inside the DDP/FSDP
forward. Durations and intervals are in kimg; gradient accumulation only splits the global batch and
never changes the experiment. The resolved config is written before step 0; checkpoints hold weights,
EMAs, optimizer, RNG states and the data position, so a resumed run continues the same stream.

Faults (docs/reliability.md): everything about the input is checked before any compute; a step with a
non-finite loss or gradient is skipped and logged (``train.max_bad_steps`` in a row stop the run);
SIGTERM/SIGINT stop after the current step with a final checkpoint; a save that fails (disk full,
permissions) is reported and retried at the next interval while the state stays in memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from fewstep import __version__
from fewstep.backbones.inputs import trusted_labels
from fewstep.build import (build_objective, build_optimizer, load_state, resolve, training_flops_per_image,
                           write_run_config)
from fewstep.checkpoints import CheckpointWriteError, load_optimizer_state, save_checkpoint
from fewstep.compiling import compile_objective, set_activation_checkpointing
from fewstep.config import RunConfig, to_dict
from fewstep.contracts import DataSpec
from fewstep.data import load_dataset
from fewstep.data.loader import BatchStream
from fewstep.images import make_grid, write_png
from fewstep.sample import output_decoder, sample
from fewstep.train.checks import RESUMABLE_CHANGES, Layout, check_config, find_resume, plan_batches
from fewstep.train.distributed import Parallel
from fewstep.train.guards import BadStep, BadSteps, NonFiniteLossError, Preemption, RunLock
from fewstep.train.status import StatusLog, describe, peak_flops, where_it_runs

__all__ = ["NonFiniteLossError", "RESUMABLE_CHANGES", "TrainResult", "check_config", "plan_batches", "train"]


@dataclass
class TrainResult:
    """Where a finished (or stopped) run stands.

    Attributes:
        stopped: ``"SIGTERM"``/``"SIGINT"`` when a signal stopped the run early, else ``None``.
        skipped_steps: steps skipped for a non-finite loss or gradient, over the whole run.
        budget_reached: ``train.max_minutes`` of training (summed over resumes) ended the run.
    """

    run_dir: Path
    step: int
    kimg: float
    loss: float | None
    checkpoint: Path | None
    stopped: str | None = None
    skipped_steps: int = 0
    budget_reached: bool = False


def _next(nimg: int, interval: float) -> float:
    """The first multiple of ``interval`` images after ``nimg`` (∞ when the interval is 0)."""
    return (math.floor(nimg / interval) + 1) * interval if interval > 0 else math.inf


def train(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> TrainResult:
    """Train ``cfg`` in ``run_dir``, resuming from its newest valid checkpoint if there is one."""
    run_dir = Path(run_dir)
    check_config(cfg)
    cfg = resolve(cfg)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda,
                              mixed_precision="bf16" if (cuda and cfg.train.precision == "bf16") else "no")
    layout = plan_batches(cfg, accelerator.num_processes)
    parallel = Parallel(cfg.train.distributed, accelerator)   # DDP or FSDP2 (refuses Accelerate's FSDP plugin)
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:
            stack.enter_context(RunLock(run_dir))
        preempt = stack.enter_context(Preemption())
        return _train(cfg, run_dir, accelerator, layout, preempt, show_progress, parallel)


def _train(cfg: RunConfig, run_dir: Path, accelerator: Accelerator, layout: Layout, preempt: Preemption,
           show_progress: bool, parallel: Parallel) -> TrainResult:
    t = cfg.train
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32

    dataset = load_dataset(cfg.data)   # checked: not empty, labels in range, items shaped as the spec
    spec: DataSpec = dataset.spec
    to_pixels = output_decoder(cfg.data, spec, device=device)   # to_uint8 for pixels; VAE decode (lazy) for latents
    notes: list[str] = []
    ckpt = find_resume(run_dir, cfg, spec, accelerator, notes)
    if main:
        write_run_config(run_dir, cfg, spec)
    accelerator.wait_for_everyone()

    torch.manual_seed(t.seed * 1000 + rank)
    objective = build_objective(cfg, spec).to(device)
    if t.activation_checkpointing:
        set_activation_checkpointing(objective, blocks=t.checkpoint_blocks)
    generator = torch.Generator(device).manual_seed(t.seed * 1000 + rank)
    guard = BadSteps(limit=t.max_bad_steps)

    step, nimg, position, prior_seconds = 0, 0, 0, 0.0
    opt_state = None
    if ckpt is not None:
        load_state(objective, ckpt)
        opt_state = load_optimizer_state(ckpt)
        step, nimg, position = ckpt.step, int(ckpt.manifest["nimg"]), int(ckpt.manifest["data_position"])
        guard.skipped = int(ckpt.manifest.get("skipped_steps", 0))
        guard.streak = int(ckpt.manifest.get("bad_streak", 0))
        prior_seconds = float(ckpt.manifest.get("train_seconds", 0.0))
        rng_file = ckpt.path / f"rng-rank{rank}.safetensors"
        if rng_file.exists():
            rng = ckpt.tensors(rng_file.name)
            torch.set_rng_state(rng["cpu"])
            generator.set_state(rng["objective"].to(generator.get_state().device))
            if cuda and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)

    if t.compile:
        compile_objective(objective, tuning=t.compile_tuning)
    objective = parallel.shard(objective)   # FSDP2: fully_shard in place, before the optimizer sees the parameters
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, cuda)
    if opt_state is not None:
        parallel.load_optimizer_state(optimizer, opt_state, params)
    model, optimizer = parallel.prepare(objective, optimizer)
    stream = BatchStream(dataset, layout.batch_per_gpu, seed=t.seed, rank=rank, world_size=layout.world,
                         num_workers=cfg.data.num_workers, device=device, start_position=position)
    batches = iter(stream)
    total_nimg = int(round(t.total_kimg * 1000))
    status = StatusLog(run_dir, t.total_kimg, nimg / 1000, enabled=main, show_progress=show_progress)
    start = where_it_runs(accelerator, cfg)
    status.event({"event": "start", "step": step, "kimg": nimg / 1000, **start}, f"running on {describe(start)}")
    for note in notes:
        status.event({"event": "checkpoint_skipped", "message": note}, f"warning: {note}")
    if ckpt is not None:
        status.print(f"resumed from {ckpt.path.name} at {nimg / 1000:.3f} kimg (step {step})")
    flops_per_img = training_flops_per_image(objective)
    peak = peak_flops(device)
    reduce_sum = (lambda v: accelerator.reduce(v, "sum")) if layout.world > 1 else None
    saved = {"step": ckpt.step if ckpt else -1, "path": ckpt.path if ckpt else None}

    def save(final: bool) -> Path | None:
        """Write checkpoint-<step> (once per step). A failure keeps the state in memory and leaves older
        checkpoints untouched; it is retried at the next interval, and raised when ``final``."""
        if saved["step"] == step:
            return saved["path"]
        rng = {"cpu": torch.get_rng_state(), "objective": generator.get_state()}
        if cuda:
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = accelerator.gather_for_metrics([rng], use_gather_object=True) if layout.world > 1 else [rng]
        state, opt = parallel.model_state(model), parallel.optimizer_state(optimizer)   # full; on rank 0
        path, error = None, None
        if main:
            try:
                path = save_checkpoint(
                    run_dir, step, objective_state=state,
                    optimizer_state=opt, rng_states=rngs, keep=t.keep_checkpoints,
                    manifest={"nimg": nimg, "kimg": nimg / 1000, "data_position": stream.position,
                              "skipped_steps": guard.skipped, "bad_streak": guard.streak,
                              "train_seconds": train_seconds(),
                              "config": to_dict(cfg), "data_spec": dataclasses.asdict(spec),
                              "fewstep_version": __version__, "torch_version": torch.__version__})
            except OSError as exc:
                error = exc
        accelerator.wait_for_everyone()
        if error is None:
            saved.update(step=step, path=path)
            return path
        newest = saved["path"].name if saved["path"] else "none yet"
        message = (f"could not write checkpoint-{step:08d} in {run_dir}: {error}. The training state is still "
                   f"in memory and the newest checkpoint ({newest}) is untouched")
        if final:
            raise CheckpointWriteError(message + "; free space or fix permissions, then rerun the same command "
                                       "to resume from it") from error
        status.event({"event": "save_failed", "step": step, "kimg": nimg / 1000, "error": str(error)},
                     f"error: {message}; training goes on and saving is retried at the next checkpoint interval")
        return None

    def plain() -> torch.nn.Module | None:
        """The objective to sample with on rank 0 (``None`` elsewhere); collective under FSDP2."""
        return parallel.sampling_objective(model, lambda: build_objective(cfg, spec))

    def grid(tag: str) -> None:
        obj = plain()
        if not main:
            return
        seeds = list(range(cfg.sample.num_images))
        blocks = [to_pixels(sample(obj, seeds, nfe, weights=cfg.sample.weights, guidance=cfg.sample.guidance,
                                  autocast=cuda and t.precision == "bf16").images) for nfe in cfg.sample.nfe]
        try:
            write_png(run_dir / "samples" / f"{tag}.png", make_grid(blocks))
        except OSError as exc:
            status.event({"event": "grid_failed", "error": str(exc)}, f"warning: sample grid {tag} not written: {exc}")

    def skip(info: BadStep) -> None:
        """Log a skipped step (``info`` merged over ranks) and stop after too many in a row."""
        if layout.world > 1:
            infos = accelerator.gather_for_metrics([info], use_gather_object=True)
            ranges = [i.t_range for i in infos if i.t_range]
            info = BadStep(list(dict.fromkeys(k for i in infos for k in i.terms)), sum(i.bad_samples for i in infos),
                           (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None, info.grad_norm)
        span = f"step {step + 1} (kimg {nimg / 1000:.3f}–{(nimg + t.batch) / 1000:.3f})"
        norm = info.grad_norm
        status.event({"event": "nonfinite", "step": step + 1, "kimg": nimg / 1000, "terms": info.terms,
                      "bad_samples": info.bad_samples, "t_range": info.t_range,
                      "grad_norm": norm if norm is None or math.isfinite(norm) else str(norm),
                      "consecutive": guard.streak, "skipped_steps": guard.skipped},
                     f"warning: skipped {span}: {info.describe()} ({guard.streak} in a row, {guard.skipped} in all)")
        if guard.exhausted:
            newest = saved["path"].name if saved["path"] else "none written yet"
            raise NonFiniteLossError(
                f"{guard.streak} consecutive steps had a non-finite loss or gradient, the last at {span}: "
                f"{info.describe()}. No bad update was applied and the newest checkpoint in {run_dir} "
                f"({newest}) is intact. Lower train.lr, set train.grad_clip or check the data; "
                f"train.max_bad_steps={t.max_bad_steps} sets how many bad steps in a row are tolerated.")

    interval = {"status": t.status_kimg * 1000, "checkpoint": t.checkpoint_kimg * 1000, "sample": t.sample_kimg * 1000}
    next_at = {k: _next(nimg, v) for k, v in interval.items()}
    sums: dict[str, torch.Tensor] = {}
    ticks, tick_start, tick_nimg = 0, time.time(), nimg
    last_loss, stopped = None, None
    budget = t.max_minutes * 60 if t.max_minutes is not None else math.inf   # seconds, over all resumes
    over = prior_seconds >= budget                                          # the same on every rank
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loop_start = None   # the budget clock starts after this invocation's first step (compiles, warm-up)

    def train_seconds() -> float:
        return prior_seconds + (time.time() - loop_start if loop_start is not None else 0.0)

    try:
        while nimg < total_nimg and not over:
            model.train()
            step_logs: dict[str, torch.Tensor] = {}
            for micro in range(layout.accumulation):
                x, y = next(batches)
                y = y if spec.num_classes else None
                sync = micro == layout.accumulation - 1
                with parallel.no_sync(model, sync):
                    with trusted_labels():   # checked when the dataset was loaded: no host sync per call
                        out = model(x, y, generator, nimg)
                    accelerator.backward(out.loss / layout.accumulation)
                guard.observe(out)
                for k, v in {"loss": out.loss, **out.logs}.items():
                    v = torch.as_tensor(v, device=device).detach().float()
                    step_logs[k] = step_logs.get(k, 0) + v / layout.accumulation
            # Global gradient norm (after unscaling, over all ranks); with no clipping, max_norm=∞ scales by 1.
            grad_norm = parallel.grad_norm(
                accelerator.clip_grad_norm_(params, t.grad_clip if t.grad_clip is not None else math.inf))
            # The one host sync of a step: bad step? past the time budget (any rank's clock, read before
            # the update)? Every rank gets the same answers, so all skip or stop together.
            past_budget = loop_start is not None and train_seconds() >= budget
            bad, over = guard.verdict(grad_norm, reduce_sum, stop=past_budget)
            if bad:
                info = guard.describe(grad_norm)
                optimizer.zero_grad(set_to_none=True)
                guard.record(True)
                skip(info)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                accelerator.unwrap_model(model).after_step()
                guard.record(False)
                if grad_norm is not None:
                    step_logs["grad_norm"] = torch.as_tensor(grad_norm, device=device).detach().float()
                for k, v in step_logs.items():
                    sums[k] = sums.get(k, 0) + v
                ticks += 1
            step, nimg = step + 1, nimg + t.batch
            loop_start = loop_start or time.time()
            done = nimg >= total_nimg or over
            if nimg >= next_at["status"] or done:
                elapsed = time.time() - tick_start
                record = {"step": step, "kimg": nimg / 1000,
                          **{k: float(accelerator.reduce(v, "mean")) / ticks for k, v in sums.items()},
                          "img_per_s": (nimg - tick_nimg) / max(elapsed, 1e-9),
                          "sec_per_kimg": elapsed / max((nimg - tick_nimg) / 1000, 1e-9), "time": time.time()}
                if guard.skipped:
                    record["skipped_steps"] = guard.skipped
                if flops_per_img:
                    record["tflops"] = flops_per_img * record["img_per_s"] / layout.world / 1e12
                    if peak:
                        record["mfu"] = record["tflops"] * 1e12 / peak
                if cuda:
                    record["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                last_loss = record.get("loss", last_loss)
                status.report(record)
                sums, ticks, tick_start, tick_nimg = {}, 0, time.time(), nimg
                next_at["status"] = _next(nimg, interval["status"])
            if nimg >= next_at["sample"] and not done and spec.kind != "points":
                grid(f"kimg{nimg / 1000:08.1f}")
                next_at["sample"] = _next(nimg, interval["sample"])
            if nimg >= next_at["checkpoint"] and not done and not guard.streak:   # in a bad streak: after it
                save(final=False)
                next_at["checkpoint"] = _next(nimg, interval["checkpoint"])
            stop = preempt.received is not None
            if reduce_sum is not None:
                stop = bool(reduce_sum(torch.tensor(float(stop), device=device)) > 0)
            if stop and not done:
                names = ([preempt.received] if reduce_sum is None else
                         accelerator.gather_for_metrics([preempt.received], use_gather_object=True))
                stopped = next(name for name in names if name)
                break
        over = over and nimg < total_nimg   # the budget, not the length, ended the run
        last_ckpt = save(final=True)
        if over:
            status.event({"event": "budget_reached", "max_minutes": t.max_minutes, "step": step, "kimg": nimg / 1000},
                         f"time budget of {t.max_minutes:g} min reached after step {step} ({nimg / 1000:.3f} kimg)")
        if stopped:
            status.event({"event": "stopped", "signal": stopped, "step": step, "kimg": nimg / 1000},
                         f"received {stopped}: stopped after step {step} ({nimg / 1000:.3f} kimg) with "
                         f"checkpoint {last_ckpt}; run the same command again to resume")
        elif spec.kind == "points":   # toy data: metrics.json (sliced Wasserstein per NFE) and a scatter plot
            obj = plain()
            if main:
                from fewstep.evaluate import evaluate_points

                held_out = load_dataset(dataclasses.replace(cfg.data, split="test"))
                evaluate_points(obj, held_out, run_dir, nfes=cfg.sample.nfe,
                                num=cfg.sample.num_images, weights=cfg.sample.weights,
                                guidance=cfg.sample.guidance)
        else:
            grid("final")
    finally:
        status.close()
    parallel.finish()   # keeps the process group for another train() in this process; destroyed at exit
    return TrainResult(run_dir=run_dir, step=step, kimg=nimg / 1000, loss=last_loss, checkpoint=last_ckpt,
                       stopped=stopped, skipped_steps=guard.skipped, budget_reached=over)
