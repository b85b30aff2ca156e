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
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from fewstep.backbones.inputs import trusted_labels
from fewstep.build import build_objective, build_optimizer, init_from_run, resolve, training_flops_per_image, write_run_config
from fewstep.compiling import compile_objective, set_activation_checkpointing
from fewstep.config import RunConfig, TrainConfig, to_dict
from fewstep.data import load_dataset
from fewstep.data.loader import BatchStream
from fewstep.schedules import TrainingSchedule
from fewstep.train.checkpointer import Checkpointer
from fewstep.train.checks import RESUMABLE_CHANGES, Layout, check_config, find_resume, plan_batches
from fewstep.train.clock import Every, TrainClock
from fewstep.train.distributed import Parallel
from fewstep.train.guards import BadStep, BadSteps, NonFiniteLossError, Preemption, RunLock
from fewstep.train.reports import ReportContext, run_report
from fewstep.train.resources import check_memory_on_all_ranks, cpu_threads, local_processes
from fewstep.train.state import TrainState
from fewstep.train.status import StatusLog, StatusMeter, describe, where_it_runs
from fewstep.train.trackers import Trackers, check_trackers

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


def train(cfg: RunConfig, run_dir: str | Path, *, show_progress: bool = True, restart: bool = False,
          resume_command: str | None = None) -> TrainResult:
    """Train ``cfg`` in ``run_dir``, resuming from its newest valid checkpoint if there is one.

    Args:
        show_progress: a progress bar on a terminal (plain status lines otherwise, and always in a file).
        restart: start the run directory over: its checkpoints (say, all broken), log and samples move aside
            into ``restarted-<time>/`` and training starts from step 0, instead of refusing.
        resume_command: the command that resumes this run, quoted in messages (the CLI passes its own
            command line with ``--out``); default: "train() with run directory DIR".
    """
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
        return _train(cfg, run_dir, accelerator, layout, parallel, preempt, stack, show_progress, restart,
                      resume_command or f"train() with run directory {run_dir}")


def _train(cfg: RunConfig, run_dir: Path, accelerator: Accelerator, layout: Layout, parallel: Parallel,
           preempt: Preemption, stack: contextlib.ExitStack, show_progress: bool, restart: bool,
           resume: str) -> TrainResult:
    t = cfg.train
    device, rank, main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
        torch.backends.cudnn.allow_tf32 = t.allow_tf32

    # Data, and the run directory: resume or start (everything about the input checked before compute).
    check_trackers(t.trackers)         # unknown or uninstalled trackers fail before any compute
    dataset = load_dataset(cfg.data)   # checked: not empty, labels in range, items shaped as the spec
    check_memory_on_all_ranks(cfg, dataset, layout.batch_per_gpu, accelerator)   # a GPU recipe on a CPU: refused
    notes: list[tuple[str, str]] = []   # (event, message) to log once the status log exists
    ckpt = find_resume(run_dir, cfg, dataset.spec, accelerator, notes, restart=restart)
    if main:
        write_run_config(run_dir, cfg, dataset.spec)
    accelerator.wait_for_everyone()
    # CPU threads: train.cpu_threads, else the count this run started with (a resume stays bit-exact), else auto.
    threads = t.cpu_threads or (ckpt.manifest.get("cpu_threads") if ckpt is not None else None)
    stack.enter_context(cpu_threads(threads, device, local_processes()))

    # The objective (backbone, EMA tracks, teacher), its optimizer and the batch stream.
    torch.manual_seed(t.seed * 1000 + rank)
    objective = build_objective(cfg, dataset.spec).to(device)
    if t.activation_checkpointing:
        set_activation_checkpointing(objective, blocks=t.checkpoint_blocks)
    generator = torch.Generator(device).manual_seed(t.seed * 1000 + rank)
    state, opt_state = TrainState(), None
    initialised = init_from_run(objective, t.init_from) if ckpt is None and t.init_from else None   # step 0 only
    if ckpt is not None:
        state, opt_state = Checkpointer.restore(ckpt, objective, generator, rank, device)
    if t.compile:
        compile_objective(objective, tuning=t.compile_tuning)
    objective = parallel.shard(objective)   # FSDP2: fully_shard in place, before the optimizer sees the parameters
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device.type == "cuda")
    if opt_state is not None:
        parallel.load_optimizer_state(optimizer, opt_state, params)
    model, optimizer = parallel.prepare(objective, optimizer)
    schedule = TrainingSchedule(t)   # lr warm-up/decay and EMA decays in kimg; a no-op with the defaults
    stream = BatchStream(dataset, layout.batch_per_gpu, seed=t.seed, rank=rank, world_size=layout.world,
                         num_workers=cfg.data.num_workers, device=device, start_position=state.data_position)
    batches = iter(stream)

    # What the run shows and writes: status, trackers, checkpoints, sample grids (or the dataset's report).
    trackers = Trackers(t.trackers, run_dir, to_dict(cfg), t.tracker_project, enabled=main)
    status = StatusLog(run_dir, t.total_kimg, state.kimg, enabled=main, show_progress=show_progress)
    preempt.notify = lambda name: status.warn(f"received {name}: stopping after this step with a checkpoint "
                                              f"(press Ctrl-C again to abort at once; the last checkpoint stays intact)")
    checkpointer = Checkpointer(run_dir, cfg, dataset.spec, accelerator, parallel, status, resume, ckpt)
    report = run_report(ReportContext(cfg, dataset, run_dir, device, status=status, trackers=trackers, resume=resume,
                                      sampling_objective=lambda: parallel.sampling_objective(
                                          model, lambda: build_objective(cfg, dataset.spec))))
    start = where_it_runs(accelerator, cfg)
    status.event({"event": "start", "step": state.step, "kimg": state.kimg, **start}, f"running on {describe(start)}",
                 logging.INFO)
    for event, note in notes:
        status.event({"event": event, "message": note}, note)
    if ckpt is not None:
        status.print(f"resumed from {ckpt.path.name} at {state.kimg:.3f} kimg (step {state.step})")
    if initialised:
        status.event({"event": "init_from", "source": initialised}, f"initialised from the {initialised}",
                     logging.INFO)
    meter = StatusMeter(accelerator, state.nimg, training_flops_per_image(objective))
    status_at, grids_at, save_at = (Every(k, state.nimg) for k in (t.status_kimg, t.sample_kimg, t.checkpoint_kimg))
    clock = TrainClock(state.train_seconds, t.max_minutes)
    guard = BadSteps(limit=t.max_bad_steps)
    reduce_sum = (lambda v: accelerator.reduce(v, "sum")) if layout.world > 1 else None
    total_nimg = int(round(t.total_kimg * 1000))
    last_loss, stopped, over = None, None, clock.spent_before   # `over`: the same on every rank

    def save(final: bool) -> Path | None:
        state.data_position, state.train_seconds = stream.position, clock.seconds()
        return checkpointer.save(state, model, optimizer, generator, final=final)

    try:
        while state.nimg < total_nimg and not over:
            # Forward and backward over the micro-batches of one global batch; every JVP runs inside the
            # wrapped forward (DDP/FSDP2), gradients are synchronised on the last micro-batch.
            model.train()
            step_logs: dict[str, torch.Tensor] = {}
            for micro in range(layout.accumulation):
                x, y = next(batches)
                with parallel.no_sync(model, sync=micro == layout.accumulation - 1):
                    with trusted_labels():   # checked when the dataset was loaded: no host sync per call
                        out = model(x, y if dataset.spec.num_classes else None, generator, state.nimg)
                    accelerator.backward(out.loss / layout.accumulation)
                guard.observe(out)
                for k, v in {"loss": out.loss, **out.logs}.items():
                    step_logs[k] = step_logs.get(k, 0) + torch.as_tensor(v, device=device).detach().float() / layout.accumulation
            # Global gradient norm (after unscaling, over all ranks); with no clipping, max_norm=∞ scales by 1.
            grad_norm = parallel.grad_norm(
                accelerator.clip_grad_norm_(params, t.grad_clip if t.grad_clip is not None else math.inf))

            # The one host sync of a step: a bad step? past the time budget (any rank's clock, read before
            # the update)? Every rank gets the same answers, so all skip or stop together.
            bad, over = guard.verdict(grad_norm, reduce_sum, stop=clock.past_budget())
            info = guard.describe(grad_norm) if bad else None
            guard.clear()
            if not bad:   # the update: optimizer, then the EMA tracks and teacher
                lr = schedule.apply(optimizer, accelerator.unwrap_model(model), state.nimg + t.batch)
                optimizer.step()
                accelerator.unwrap_model(model).after_step()
                meter.add({**step_logs, **({"lr": torch.tensor(lr, device=device)} if schedule.varies else {}),
                           **({"grad_norm": torch.as_tensor(grad_norm, device=device).detach().float()}
                              if grad_norm is not None else {})})
            optimizer.zero_grad(set_to_none=True)
            state.advance(t.batch, applied=not bad)
            if bad:
                _bad_step(info, state, guard, t, accelerator, status, checkpointer, run_dir)
            status.advance(state.kimg)
            clock.step_done()

            # Status line, sample grids and checkpoints at their intervals; a signal stops after this step.
            done = state.nimg >= total_nimg or over
            if status_at.due(state.nimg) or done:
                record = meter.record(state.step, state.nimg, state.skipped_steps)
                last_loss = record.get("loss", last_loss)
                status.report(record)
                trackers.log(record, state.step)
                status_at.passed(state.nimg)
            if grids_at.due(state.nimg) and not done:
                report.interval(f"kimg{state.kimg:08.1f}", state.step)
                grids_at.passed(state.nimg)
            if save_at.due(state.nimg) and not done and not state.bad_streak:   # in a bad streak: after it
                save(final=False)
                save_at.passed(state.nimg)
            stopped = preempt.agreed(accelerator)
            if stopped and not done:
                break
            stopped = None

        # The end: a final checkpoint, then the final report (unless a signal cut the run short).
        over = over and state.nimg < total_nimg   # the budget, not the length, ended the run
        last_ckpt = save(final=True)
        if over:
            status.event({"event": "budget_reached", "max_minutes": t.max_minutes, "step": state.step,
                          "kimg": state.kimg}, f"time budget of {t.max_minutes:g} min reached after step "
                                               f"{state.step} ({state.kimg:.3f} kimg)", logging.INFO)
        if stopped:
            status.event({"event": "stopped", "signal": stopped, "step": state.step, "kimg": state.kimg,
                          "resume": resume}, f"received {stopped}: stopped after step {state.step} "
                                             f"({state.kimg:.3f} kimg) with checkpoint {last_ckpt}; to resume, run: {resume}")
        else:
            report.final(state.step)
    finally:
        status.close()
        trackers.finish()
    parallel.finish()   # keeps the process group for another train() in this process; destroyed at exit
    return TrainResult(run_dir=run_dir, step=state.step, kimg=state.kimg, loss=last_loss, checkpoint=last_ckpt,
                       stopped=stopped, skipped_steps=state.skipped_steps, budget_reached=over)


def _bad_step(info: BadStep, state: TrainState, guard: BadSteps, t: TrainConfig, accelerator: Accelerator,
              status: StatusLog, checkpointer: Checkpointer, run_dir: Path) -> None:
    """Log a skipped step (``info`` merged over ranks; ``state`` already counts it) and stop the run with
    :class:`NonFiniteLossError` after ``train.max_bad_steps`` of them in a row (collective)."""
    if accelerator.num_processes > 1:
        info = BadStep.merged(accelerator.gather_for_metrics([info], use_gather_object=True))
    start_kimg = (state.nimg - t.batch) / 1000
    span = f"step {state.step} (kimg {start_kimg:.3f}–{state.kimg:.3f})"
    norm = info.grad_norm
    status.event({"event": "nonfinite", "step": state.step, "kimg": start_kimg, "terms": info.terms,
                  "bad_samples": info.bad_samples, "t_range": info.t_range,
                  "grad_norm": norm if norm is None or math.isfinite(norm) else str(norm),
                  "consecutive": state.bad_streak, "skipped_steps": state.skipped_steps},
                 f"skipped {span}: {info.describe()} ({state.bad_streak} in a row, {state.skipped_steps} in all)")
    if state.bad_streak >= guard.limit:
        newest = checkpointer.newest.name if checkpointer.newest else "none written yet"
        raise NonFiniteLossError(
            f"{state.bad_streak} consecutive steps had a non-finite loss or gradient, the last at {span}: "
            f"{info.describe()}. No bad update was applied and the newest checkpoint in {run_dir} ({newest}) is "
            f"intact. Lower train.lr, set train.grad_clip or check the data; train.max_bad_steps={t.max_bad_steps} "
            f"sets how many bad steps in a row are tolerated.")
