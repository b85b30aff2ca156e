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

from fewstep.sweep.report import write_report
from fewstep.sweep.spec import POINTS_METRIC, SweepError, SweepSpec, check_saved, member_config, resolve_metric
from fewstep.sweep.worker import reference_path, run_unit, unit_dir, unit_label, unit_state


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


def prepare(spec: SweepSpec, sweep_dir: Path, log: Callable[[str], None] = lambda message: None) -> SweepSpec:
    """Check every member's config (before any compute), resolve ``metrics``, and save or compare ``sweep.json``
    (a changed budget value or seed list is saved and logged: units then train on, or start)."""
    from fewstep.data import load_dataset

    configs = [member_config(spec, m, seed) for m in spec.members for seed in spec.seeds]
    data = {(c.data.name, c.data.root, c.data.resolution) for c in configs}
    if len(data) > 1:
        raise SweepError(f"members train on different data {sorted(map(str, data))}; a sweep compares on one dataset")
    kind = load_dataset(configs[0].data).spec.kind
    spec = dataclasses.replace(spec, metrics=resolve_metric(spec, configs[0], kind))
    if spec.eval_every_kimg is not None:      # the curves need matplotlib: say so before any compute
        from fewstep.sweep.curves import pyplot

        pyplot()
    for change in check_saved(sweep_dir, spec):
        log(f"spec changed ({change}): units train on from their checkpoints (or start) and are evaluated again")
    return spec


def units(spec: SweepSpec) -> list[tuple[str, int]]:
    """(member, seed) of every unit: all members of the first seed, then of the next seed, …"""
    return [(m.name, seed) for seed in spec.seeds for m in spec.members]


def ensure_reference(spec: SweepSpec, sweep_dir: Path, log: Callable[[str], None]) -> None:
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
        from fewstep.eval import make_reference

        log(f"reference statistics: {metric} features of {data.name} ({data.split}, {spec.protocol} protocol) "
            f"→ {path.name}")
        make_reference(data, path, extractor=metric, num=spec.ref_num, protocol=spec.protocol, show_progress=False)


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, parallel: int = 1, gpus: Sequence[str] | None = None,
              eval_batch: int | None = None, log: Callable[[str], None] = print) -> SweepResult:
    """Run (or resume) a sweep in ``sweep_dir`` and write its report.

    Args:
        spec: the sweep; ``metrics`` with ``auto`` are resolved and the result saved as ``sweep.json``.
        parallel: units at a time (per GPU when ``gpus`` is given).
        gpus: CUDA device ids to deal units to, one unit per GPU at a time (× ``parallel``).
        eval_batch: images per sampler/extractor call (does not change the images).
        log: where progress lines go.
    """
    sweep_dir = Path(sweep_dir)
    if parallel < 1:
        raise SweepError(f"--parallel must be ≥ 1, got {parallel}")
    spec = prepare(spec, sweep_dir, log)
    result = SweepResult(sweep_dir)
    todo = []
    for name, seed in units(spec):
        member = spec.member(name)
        state = unit_state(sweep_dir, spec, member, seed, member_config(spec, member, seed))
        (result.skipped if state.finished else todo).append((name, seed))
    result.skipped = [unit_label(n, s) for n, s in result.skipped]
    if result.skipped:
        log(f"finished already, skipped: {', '.join(result.skipped)}")
    if todo:
        ensure_reference(spec, sweep_dir, log)
        slots = [g for g in (gpus or [None]) for _ in range(parallel)]
        if len(slots) == 1 and slots[0] is None and not torch.cuda.is_available():
            _run_here(spec, sweep_dir, todo, result, eval_batch, log)
        else:
            _run_subprocesses(spec, sweep_dir, todo, slots, result, eval_batch, log)
    result.files = write_report(sweep_dir, spec, failed=result.failed)
    return result


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
              eval_batch: int | None, log: Callable[[str], None]) -> None:
    """Units one after another in this process (training installs its own stop handlers)."""
    stop: list[str] = []
    with _signals(stop.append):
        for name, seed in todo:
            if stop:
                break
            label = unit_label(name, seed)
            log(f"{label}: starting")
            t0 = time.time()
            try:
                outcome = run_unit(sweep_dir, spec, name, seed, eval_batch=eval_batch, log=log)
            except Exception as exc:   # one unit's failure (e.g. divergence) is a result, not the end
                where = unit_dir(sweep_dir, spec.member(name), seed)
                where.mkdir(parents=True, exist_ok=True)
                (where / "worker.log").write_text(traceback.format_exc())
                result.failed[label] = f"{type(exc).__name__}: {exc}"
                log(f"{label}: failed: {result.failed[label]}")
                continue
            if outcome != "finished":
                stop.append(outcome)
                break
            result.ran.append(label)
            log(f"{label}: finished in {time.time() - t0:.0f} s")
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
                      result: SweepResult, eval_batch: int | None, log: Callable[[str], None],
                      progress_every: float = 60.0) -> None:
    """Units as subprocesses, ``len(slots)`` at a time; each slot pins its GPU, if any. The first
    SIGTERM/SIGINT is passed on once to every running unit (they checkpoint and exit); a second one
    kills them."""
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
                for slot in range(len(slots)):
                    if slot in running or not queue or stop:
                        continue
                    name, seed = queue.pop(0)
                    proc = _launch(sweep_dir, spec, name, seed, slots[slot], threads, eval_batch)
                    running[slot] = ((name, seed), proc, time.time())
                    where = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                    log_file = unit_dir(sweep_dir, spec.member(name), seed) / "worker.log"
                    log(f"{unit_label(name, seed)}: started{where} (pid {proc.pid}, log {log_file})")
                for slot, ((name, seed), proc, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[slot]
                    label = unit_label(name, seed)
                    if code == 0:
                        result.ran.append(label)
                        log(f"{label}: finished in {time.time() - t0:.0f} s")
                    elif code in stop_codes and (stop or code > 0):
                        log(f"{label}: stopped with a checkpoint; rerun to resume")
                    else:
                        log_file = unit_dir(sweep_dir, spec.member(name), seed) / "worker.log"
                        result.failed[label] = f"exit code {code}; see {log_file}"
                        log(f"{label}: failed ({result.failed[label]})")
                if running and time.time() >= next_progress:
                    log(_progress_line(sweep_dir, spec, [unit for unit, _, _ in running.values()]))
                    next_progress = time.time() + progress_every
                time.sleep(0.2)
        finally:   # the sweep itself failed: leave no member running
            for _, proc, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
    result.stopped = stop[0] if stop else None
