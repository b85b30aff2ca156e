"""Running a sweep: check the spec against the sweep directory, make the reference statistics once, bring
every unfinished member to finished (one after another, or side by side as subprocesses), then write
the report.

Members run in this process only when they run one at a time on a CPU. Anywhere else each member is a
subprocess (``python -m fewstep.sweep``, output in ``MEMBER/worker.log``): a process keeps one
Accelerate state, and on a GPU it fixes the mixed precision of the first run for all later ones. With
``parallel`` K, K members share the visible device(s); with ``gpus``, members are dealt to those GPUs
(``CUDA_VISIBLE_DEVICES``), ``parallel`` per GPU. SIGTERM/SIGINT stop the sweep: running members get
one SIGTERM, save a checkpoint and exit; rerunning the same command resumes them.
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
from fewstep.sweep.worker import member_state, reference_path, run_member

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What one invocation did.

    Attributes:
        sweep_dir: the sweep directory.
        skipped: members already finished before this invocation (no training, no evaluation).
        ran: members brought to finished now.
        failed: member → error message (its ``worker.log`` or the exception).
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
    """Check every member's config (before any compute), resolve ``metric``, and save or compare ``sweep.json``
    (a changed budget is saved and logged: members then train on)."""
    from fewstep.data import load_dataset

    configs = [member_config(spec, m, sweep_dir) for m in spec.members]
    data = {(c.data.name, c.data.root, c.data.resolution) for c in configs}
    if len(data) > 1:
        raise SweepError(f"members train on different data {sorted(map(str, data))}; a sweep compares on one dataset")
    kind = load_dataset(configs[0].data).spec.kind
    spec = dataclasses.replace(spec, metric=resolve_metric(spec, configs[0], kind))
    for change in check_saved(sweep_dir, spec):
        log.info(f"budget changed ({change}): members train on from their checkpoints and are evaluated again")
    return spec


def ensure_reference(spec: SweepSpec, sweep_dir: Path) -> None:
    """Make ``reference-<metric>.npz`` from the training split once (image metrics without ``spec.ref``)."""
    path = reference_path(sweep_dir, spec)
    if spec.metric == POINTS_METRIC or path.is_file():
        return
    if spec.ref:
        raise FileNotFoundError(f"reference statistics {path} not found")
    from fewstep.eval import make_reference

    data = member_config(spec, spec.members[0]).data
    log.info(f"reference statistics: {spec.metric} features of {data.name} ({data.split}) → {path.name}")
    make_reference(data, path, extractor=spec.metric, num=spec.ref_num, show_progress=False)


def run_sweep(spec: SweepSpec, sweep_dir: str | Path, *, parallel: int = 1, gpus: Sequence[str] | None = None,
              eval_batch: int | None = None) -> SweepResult:
    """Run (or resume) a sweep in ``sweep_dir`` and write its report.

    Args:
        spec: the sweep; ``metric="auto"`` is resolved and the result saved as ``sweep.json``.
        parallel: members at a time (per GPU when ``gpus`` is given).
        gpus: CUDA device ids to deal members to, one member per GPU at a time (× ``parallel``).
        eval_batch: images per sampler/extractor call (does not change the images).
    """
    sweep_dir = Path(sweep_dir)
    if parallel < 1:
        raise SweepError(f"--parallel must be ≥ 1, got {parallel}")
    spec = prepare(spec, sweep_dir)
    if not gpus and not torch.cuda.is_available():   # GPU recipes on a CPU: refused before any member starts
        check_members_memory(spec, parallel)
    result = SweepResult(sweep_dir)
    todo = []
    for member in spec.members:
        state = member_state(sweep_dir, spec, member, member_config(spec, member, sweep_dir))
        (result.skipped if state.finished else todo).append(member.name)
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
                         f"member's checkpoint and scores are saved; free space, then rerun the same command: it only "
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


def _run_here(spec: SweepSpec, sweep_dir: Path, todo: list[str], result: SweepResult, eval_batch: int | None) -> None:
    """Members one after another in this process (training installs its own stop handlers)."""
    stop: list[str] = []
    with _signals(stop.append):
        for name in todo:
            if stop:
                break
            source = spec.member(name).init_from
            if source in result.failed:
                result.failed[name] = f"not started: the member it initialises from, {source!r}, failed"
                log.info(f"{name}: {result.failed[name]}")
                continue
            log.info(f"{name}: starting")
            t0 = time.time()
            try:
                outcome = run_member(sweep_dir, spec, name, eval_batch=eval_batch)
            except Exception as exc:   # one member's failure (e.g. divergence) is a result, not the end
                try:
                    write_atomic(sweep_dir / name / "worker.log", traceback.format_exc())
                except OSError:   # a full disk: the message below still says what failed
                    pass
                result.failed[name] = f"{type(exc).__name__}: {exc}"
                log.info(f"{name}: failed: {result.failed[name]}")
                continue
            if outcome != "finished":
                stop.append(outcome)
                break
            result.ran.append(name)
            log.info(f"{name}: finished in {time.time() - t0:.0f} s")
    result.stopped = stop[0] if stop else None


def _launch(sweep_dir: Path, name: str, gpu: str | None, threads: int, eval_batch: int | None) -> subprocess.Popen:
    """Start ``python -m fewstep.sweep SWEEP_DIR NAME`` in its own session (signals reach it only from the
    sweep), output appended to ``NAME/worker.log``."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))   # K processes × all cores of OpenMP threads would thrash
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    (sweep_dir / name).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fewstep.sweep", str(sweep_dir), name]
    cmd += ["--eval-batch", str(eval_batch)] if eval_batch else []
    with open(sweep_dir / name / "worker.log", "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _progress_line(sweep_dir: Path, names: list[str]) -> str:
    """``name kimg`` of each running member, from the last status record of its log."""
    from fewstep.train.status import status_records

    parts = []
    for name in names:
        records = status_records(sweep_dir / name)
        parts.append(f"{name} {records[-1]['kimg']:.1f} kimg" if records else f"{name} starting")
    return "progress: " + ", ".join(parts)


def _run_subprocesses(spec: SweepSpec, sweep_dir: Path, todo: list[str], slots: list[str | None],
                      result: SweepResult, eval_batch: int | None,
                      progress_every: float = 60.0) -> None:
    """Members as subprocesses, ``len(slots)`` at a time; each slot pins its GPU, if any. The first
    SIGTERM/SIGINT is passed on once to every running member (they checkpoint and exit); a second one
    kills them."""
    queue, running = list(todo), {}   # running: slot index → (name, Popen, start time)
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
                for name in [n for n in queue if spec.member(n).init_from in result.failed]:
                    queue.remove(name)
                    result.failed[name] = f"not started: the member it initialises from, {spec.member(name).init_from!r}, failed"
                    log.info(f"{name}: {result.failed[name]}")
                busy = {n for n, _, _ in running.values()} | set(queue)
                ready = [n for n in queue if spec.member(n).init_from not in busy]   # sources finished first
                for slot in range(len(slots)):
                    if slot in running or not ready or stop:
                        continue
                    name = ready.pop(0)
                    queue.remove(name)
                    proc = _launch(sweep_dir, name, slots[slot], threads, eval_batch)
                    running[slot] = (name, proc, time.time())
                    where = f" on GPU {slots[slot]}" if slots[slot] is not None else ""
                    log.info(f"{name}: started{where} (pid {proc.pid}, log {sweep_dir / name / 'worker.log'})")
                for slot, (name, proc, t0) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[slot]
                    if code == 0:
                        result.ran.append(name)
                        log.info(f"{name}: finished in {time.time() - t0:.0f} s")
                    elif code in stop_codes and (stop or code > 0):
                        log.info(f"{name}: stopped with a checkpoint; rerun to resume")
                    else:
                        result.failed[name] = f"exit code {code}; see {sweep_dir / name / 'worker.log'}"
                        log.info(f"{name}: failed ({result.failed[name]})")
                if running and time.time() >= next_progress:
                    log.info(_progress_line(sweep_dir, [name for name, _, _ in running.values()]))
                    next_progress = time.time() + progress_every
                time.sleep(0.2)
        finally:   # the sweep itself failed: leave no member running
            for _, proc, _ in running.values():
                if proc.poll() is None:
                    proc.kill()
    result.stopped = stop[0] if stop else None
