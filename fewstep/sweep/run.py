"""Running a sweep: check the spec against the sweep directory, make the reference statistics once, bring
every unfinished unit (member × training seed; all members of the first seed first) to finished (one
after another, or side by side as subprocesses), then write the report.

Units run in this process only when they run one at a time on a CPU. Anywhere else each unit is a
subprocess (``python -m fewstep.sweep SWEEP MEMBER --seed K``, output in ``MEMBER/seed-K/worker.log``): a
process keeps one Accelerate state, and on a GPU it fixes the mixed precision of the first run for all
later ones. With ``parallel`` P, P units share the visible device(s); with ``gpus``, units are dealt to
those GPUs (``CUDA_VISIBLE_DEVICES``), ``parallel`` per GPU. SIGTERM/SIGINT stop the sweep: running units
get one SIGTERM, save a checkpoint and exit; rerunning the same command resumes them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fewstep.config import ConfigError
from fewstep.files import describe_os_error, write_atomic
from fewstep.sweep.report import write_report
from fewstep.sweep.spec import POINTS_METRIC, SweepError, SweepSpec, check_saved, member_config, resolve_metric
from fewstep.sweep.worker import reference_path, run_unit, unit_dir, unit_label, unit_state

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What one invocation did.

    Attributes:
        sweep_dir: the sweep directory.
        skipped: units (``member/seed-K``) already finished before this invocation (no training, no evaluation).
        ran: units brought to finished now.
        failed: unit → error message (its ``worker.log`` or the exception).
        stopped: the signal that stopped the sweep, or ``None``.
        files: the report files written.
    """

    sweep_dir: Path
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None
    files: list[Path] = field(default_factory=list)


def prepare(spec: SweepSpec, sweep_dir: Path) -> SweepSpec:
    """Check every member's config (before any compute), resolve ``metrics``, and save or compare ``sweep.json``
    (a changed budget value or seed list is saved and logged: units then train on, or start)."""
    from fewstep.data import load_dataset

    configs = [member_config(spec, m, seed, sweep_dir) for m in spec.members for seed in spec.seeds]
    data = {(c.data.name, c.data.root, c.data.resolution) for c in configs}
    if len(data) > 1:
        raise SweepError(f"members train on different data {sorted(map(str, data))}; a sweep compares on one dataset")
    kind = load_dataset(configs[0].data).spec.kind
    spec = dataclasses.replace(spec, metrics=resolve_metric(spec, configs[0], kind))
    if spec.eval_every_kimg is not None:      # the curves need matplotlib: say so before any compute
        from fewstep.plots import figure

        figure(1, 1)
    for change in check_saved(sweep_dir, spec):
        log.info(f"spec changed ({change}): units train on from their checkpoints (or start) and are evaluated again")
    return spec


def units(spec: SweepSpec) -> list[tuple[str, int]]:
    """(member, seed) of every unit: all members of the first seed, then of the next seed, …"""
    return [(m.name, seed) for seed in spec.seeds for m in spec.members]


def ensure_reference(spec: SweepSpec, sweep_dir: Path) -> None:
    """Make ``reference-<metric>[-<protocol>].npz`` from the training split once per image metric (without
    ``spec.ref``)."""
    if spec.metrics == (POINTS_METRIC,):
        return
    data = member_config(spec, spec.members[0]).data
    for metric in spec.metrics:
        path = reference_path(sweep_dir, spec, metric)
        if path.is_file():
            continue
        if spec.ref:
            raise FileNotFoundError(f"reference statistics {path} not found")
        from fewstep.evaluate_images import make_reference

        log.info(f"reference statistics: {metric} features of {data.name} ({data.split}, {spec.protocol} protocol) "
            f"→ {path.name}")
        make_reference(data, path, extractor=metric, num=spec.ref_num, protocol=spec.protocol, show_progress=False)


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, parallel: int = 1, gpus: Sequence[str] | None = None,
              eval_batch: int | None = None) -> SweepResult:
    """Run (or resume) a sweep in ``sweep_dir`` and write its report.

    Args:
        spec: the sweep; ``metrics`` with ``auto`` are resolved and the result saved as ``sweep.json``.
        parallel: units at a time (per GPU when ``gpus`` is given).
        gpus: CUDA device ids to deal units to, one unit per GPU at a time (× ``parallel``).
        eval_batch: images per sampler/extractor call (does not change the images).
    """
    sweep_dir = Path(sweep_dir)
    if parallel < 1:
        raise SweepError(f"--parallel must be ≥ 1, got {parallel}")
    spec = prepare(spec, sweep_dir)
    if not gpus and not torch.cuda.is_available():   # GPU recipes on a CPU: refused before any unit starts
        check_members_memory(spec, parallel)
    result = SweepResult(sweep_dir)
    todo = []
    for name, seed in units(spec):
        member = spec.member(name)
        state = unit_state(sweep_dir, spec, member, seed, member_config(spec, member, seed, sweep_dir))
        (result.skipped if state.finished else todo).append((name, seed))
    result.skipped = [unit_label(n, s) for n, s in result.skipped]
    if result.skipped:
        log.info(f"finished already, skipped: {', '.join(result.skipped)}")
    if todo:
        ensure_reference(spec, sweep_dir)
        slots = [g for g in (gpus or [None]) for _ in range(parallel)]
        if len(slots) == 1 and slots[0] is None and not torch.cuda.is_available():
            _run_here(spec, sweep_dir, todo, result, eval_batch)
        else:
            _run_subprocesses(spec, sweep_dir, todo, slots, result, eval_batch)
    try:
        result.files = write_report(sweep_dir, spec, failed=result.failed)
    except OSError as exc:
        raise SweepError(f"could not write the sweep's report in {sweep_dir}: {describe_os_error(exc)}. Every finished "
                         f"unit's checkpoint and scores are saved; free space, then rerun the same command: it only "
                         f"writes the report") from exc
    return result


def check_members_memory(spec: SweepSpec, parallel: int) -> None:
    """Refuse a CPU sweep whose members cannot fit in memory, ``parallel`` at a time, naming the member."""
    from fewstep.data import load_dataset
    from fewstep.train.checks import plan_batches
    from fewstep.train.resources import check_memory

    dataset = None
    for member in spec.members:
        cfg = member_config(spec, member)
        dataset = dataset or load_dataset(cfg.data)
        try:
            check_memory(cfg, dataset, plan_batches(cfg, 1).batch_per_gpu, torch.device("cpu"), processes=parallel)
        except ConfigError as exc:
            raise SweepError(f"member {member.name}: {exc}") from exc


def _source_failed(spec: SweepSpec, name: str, seed: int, result: SweepResult) -> bool:
    """Whether the unit a member initialises from (same seed) failed: then this unit is not started."""
    source = spec.member(name).init_from
    if source and unit_label(source, seed) in result.failed:
        result.failed[unit_label(name, seed)] = (f"not started: the member it initialises from, {source!r}, "
                                                 f"failed")
        log.info(f"{unit_label(name, seed)}: {result.failed[unit_label(name, seed)]}")
        return True
    return False


@contextlib.contextmanager
def _signals(on_signal: Callable[[str], None]):
    """SIGTERM/SIGINT call ``on_signal(name)`` while active (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda n, f: on_signal(signal.Signals(n).name))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run_here(spec: SweepSpec, sweep_dir: Path, todo: list[tuple[str, int]], result: SweepResult,
              eval_batch: int | None) -> None:
    """Units one after another in this process (training installs its own stop handlers)."""
    stop: list[str] = []
    with _signals(stop.append):
        for name, seed in todo:
            if stop:
                break
            if _source_failed(spec, name, seed, result):
                continue
            label = unit_label(name, seed)
            log.info(f"{label}: starting")
            t0 = time.time()
            try:
                outcome = run_unit(sweep_dir, spec, name, seed, eval_batch=eval_batch)
            except Exception as exc:   # one unit's failure (e.g. divergence) is a result, not the end
                try:
                    write_atomic(unit_dir(sweep_dir, spec.member(name), seed) / "worker.log", traceback.format_exc())
                except OSError:   # a full disk: the message below still says what failed
                    pass
                result.failed[label] = f"{type(exc).__name__}: {exc}"
                log.info(f"{label}: failed: {result.failed[label]}")
                continue
            if outcome != "finished":
                stop.append(outcome)
                break
            result.ran.append(label)
            log.info(f"{label}: finished in {time.time() - t0:.0f} s")
    result.stopped = stop[0] if stop else None


def _launch(sweep_dir: Path, spec: SweepSpec, name: str, seed: int, gpu: str | None, threads: int,
            eval_batch: int | None) -> subprocess.Popen:
    """Start ``python -m fewstep.sweep SWEEP_DIR NAME --seed SEED`` in its own session (signals reach it only
    from the sweep), output appended to ``NAME/seed-SEED/worker.log``."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))   # K processes × all cores of OpenMP threads would thrash
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    where = unit_dir(sweep_dir, spec.member(name), seed)
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fewstep.sweep", str(sweep_dir), name, "--seed", str(seed)]
    cmd += ["--eval-batch", str(eval_batch)] if eval_batch else []
    with open(where / "worker.log", "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _progress_line(sweep_dir: Path, spec: SweepSpec, running: list[tuple[str, int]]) -> str:
    """``member/seed-K kimg`` of each running unit, from the last status record of its log."""
    from fewstep.train.status import status_records

    parts = []
    for name, seed in running:
        records = status_records(unit_dir(sweep_dir, spec.member(name), seed))
        label = unit_label(name, seed)
        parts.append(f"{label} {records[-1]['kimg']:.1f} kimg" if records else f"{label} starting")
    return "progress: " + ", ".join(parts)


def _run_subprocesses(spec: SweepSpec, sweep_dir: Path, todo: list[tuple[str, int]], slots: list[str | None],
                      result: SweepResult, eval_batch: int | None, progress_every: float = 60.0) -> None:
    """Units as subprocesses, ``len(slots)`` at a time; each slot pins its GPU, if any. The first
    SIGTERM/SIGINT is passed on once to every running unit (they checkpoint and exit); a second one
    kills them. A unit that initialises from another member's unit (same seed) starts after it finished,
    and not at all when it failed."""
    queue, running = list(todo), {}   # running: slot index → ((name, seed), Popen, start time)
    stop: list[str] = []
    signalled = 0
    stop_codes = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    next_progress = time.time() + progress_every
    with _signals(stop.append):
        try:
            while queue or running:
                if len(stop) > signalled:   # 1st signal: SIGTERM once to each member; 2nd: SIGKILL
                    for _, proc, _ in running.values():
                        proc.send_signal(signal.SIGTERM if signalled == 0 else signal.SIGKILL)
                    signalled = len(stop)
                queue = [(n, k) for n, k in queue if not _source_failed(spec, n, k, result)]
                busy = {unit for unit, _, _ in running.values()} | set(queue)
                ready = [(n, k) for n, k in queue if (spec.member(n).init_from, k) not in busy]   # sources first
                for slot in range(len(slots)):
                    if slot in running or not ready or stop:
                        continue
                    name, seed = ready.pop(0)
                    queue.remove((name, seed))
                    proc = _launch(sweep_dir, spec, name, seed, slots[slot], threads, eval_batch)
                    running[slot] = ((name, seed), proc, time.time())
                    where = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                    log_file = unit_dir(sweep_dir, spec.member(name), seed) / "worker.log"
                    log.info(f"{unit_label(name, seed)}: started{where} (pid {proc.pid}, log {log_file})")
                for slot, ((name, seed), proc, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[slot]
                    label = unit_label(name, seed)
                    if code == 0:
                        result.ran.append(label)
                        log.info(f"{label}: finished in {time.time() - t0:.0f} s")
                    elif code in stop_codes and (stop or code > 0):
                        log.info(f"{label}: stopped with a checkpoint; rerun to resume")
                    else:
                        log_file = unit_dir(sweep_dir, spec.member(name), seed) / "worker.log"
                        result.failed[label] = f"exit code {code}; see {log_file}"
                        log.info(f"{label}: failed ({result.failed[label]})")
                if running and time.time() >= next_progress:
                    log.info(_progress_line(sweep_dir, spec, [unit for unit, _, _ in running.values()]))
                    next_progress = time.time() + progress_every
                time.sleep(0.2)
        finally:   # the sweep itself failed: leave no member running
            for _, proc, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
    result.stopped = stop[0] if stop else None
