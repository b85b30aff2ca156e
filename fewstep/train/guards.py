"""What keeps a run alive through faults: preemption signals, non-finite steps, one writer per run.

* :class:`Preemption` turns SIGTERM/SIGINT into a request to stop after the current step (the loop then
  writes a final checkpoint); a second signal acts as it would without it (Ctrl-C twice aborts at once).
* :class:`BadSteps` decides whether a step's update is applied: a step whose loss or global gradient
  norm is non-finite is skipped, counted and described (which loss terms, how many samples, their
  time range); ``limit`` consecutive skipped steps raise :class:`NonFiniteLossError`.
* :class:`RunLock` holds an exclusive lock on the run directory, so two processes never train into it.
"""
from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from fewstep.config import ConfigError
from fewstep.contracts import LossOutput


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient; no bad update was ever applied and
    the newest checkpoint is intact."""


class Preemption:
    """Context manager: while active, SIGTERM and SIGINT set :attr:`received` instead of killing.

    Handlers are installed only in the main thread (elsewhere signals keep their default behaviour)
    and the previous handlers are restored on exit.

    Args:
        notify: called with the signal's name when the first one arrives (the trainer prints
            "stopping after this step"), so a user who pressed Ctrl-C knows it was heard.

    Attributes:
        received: name of the first signal received (``"SIGTERM"``/``"SIGINT"``), or ``None``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, notify: Callable[[str], None] | None = None) -> None:
        self.received: str | None = None
        self.notify = notify
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        previous = self._previous.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)   # the next one is not caught
        if first and self.notify is not None:
            self.notify(self.received)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> str | None:
        """The signal that stops the run, the same on every rank: one that any rank received (collective:
        call on every rank after every step; a flag summed over ranks)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        if not accelerator.reduce(flag, "sum") > 0:
            return None
        return next(name for name in accelerator.gather_for_metrics([self.received], use_gather_object=True) if name)


@dataclass
class BadStep:
    """What went wrong in one skipped step.

    Attributes:
        terms: names of non-finite values: ``loss``, the objective's log terms, ``grad_norm``.
        bad_samples: samples whose per-sample loss is non-finite (over all micro-batches).
        t_range: (min, max) time t of those samples, when the objective reports ``LossOutput.t``.
        grad_norm: global gradient norm (before clipping), possibly inf/nan.
    """

    terms: list[str]
    bad_samples: int
    t_range: tuple[float, float] | None
    grad_norm: float | None

    @classmethod
    def merged(cls, infos: list[BadStep]) -> BadStep:
        """One description of a step from every rank's: all terms, all bad samples, the widest t range."""
        ranges = [i.t_range for i in infos if i.t_range]
        return cls(list(dict.fromkeys(k for i in infos for k in i.terms)), sum(i.bad_samples for i in infos),
                   (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None, infos[0].grad_norm)

    def describe(self) -> str:
        where = f"{self.bad_samples} sample(s) with a non-finite loss" if self.bad_samples else "no sample's loss"
        if self.t_range is not None:
            where += f", t in [{self.t_range[0]:.4g}, {self.t_range[1]:.4g}]"
        terms = ", ".join(self.terms) if self.terms else "none"
        return f"non-finite: {terms}; {where}; grad norm {self.grad_norm}"


@dataclass
class BadSteps:
    """Per-step non-finite detection with one host sync per step.

    Call :meth:`observe` on each micro-batch's :class:`LossOutput`, then :meth:`verdict` with the global
    gradient norm (and, on several processes, a reduce function); :meth:`describe` says what went wrong in
    a bad step, and :meth:`clear` forgets the step's outputs. The counts of skipped steps live in the
    run's :class:`~fewstep.train.state.TrainState` (they are saved in checkpoints).

    Attributes:
        limit: consecutive skipped steps that stop training (``train.max_bad_steps``).
    """

    limit: int
    _outs: list[LossOutput] = field(default_factory=list)

    def observe(self, out: LossOutput) -> None:
        self._outs.append(out)

    def verdict(self, grad_norm: Tensor | None, reduce: Any = None, stop: bool = False) -> tuple[bool, bool]:
        """(bad, stop) for this step, from one reduction over processes (the step's one host sync):
        bad when any process saw a non-finite loss or the (global) gradient norm is non-finite; stop when
        any process passed ``stop=True`` (its clock is past the time budget), so all stop together."""
        bad = torch.stack([~torch.isfinite(o.loss.detach()).reshape(()) for o in self._outs]).any().float()
        if grad_norm is not None:
            bad = bad + (~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))).float()
        flags = torch.stack([bad, torch.tensor(float(stop), device=bad.device)])
        if reduce is not None:
            flags = reduce(flags)
        any_bad, any_stop = (flags > 0).tolist()
        return any_bad, any_stop

    def describe(self, grad_norm: Tensor | None) -> BadStep:
        """Which terms went bad in this step's micro-batches (call only for a bad step: it syncs)."""
        terms: dict[str, None] = {}
        bad_t: list[Tensor] = []
        bad_samples = 0
        for out in self._outs:
            if not torch.isfinite(out.loss.detach()).all():
                terms["loss"] = None
            for key, value in out.logs.items():
                if not math.isfinite(float(value)):
                    terms[key] = None
            per = out.per_sample.detach()
            bad = ~torch.isfinite(per) if per.ndim == 1 else torch.zeros(0, dtype=torch.bool)
            bad_samples += int(bad.sum())
            t = getattr(out, "t", None)
            if t is not None and bad.any() and t.shape == per.shape:
                bad_t.append(t.detach()[bad].float().cpu())
        norm = None if grad_norm is None else float(grad_norm)
        if norm is not None and not math.isfinite(norm):
            terms["grad_norm"] = None
        t_all = torch.cat(bad_t) if bad_t else None
        t_range = (float(t_all.min()), float(t_all.max())) if t_all is not None and t_all.numel() else None
        return BadStep(list(terms), bad_samples, t_range, norm)

    def clear(self) -> None:
        """Forget this step's outputs (call once per step, after the verdict)."""
        self._outs.clear()


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` (POSIX), released when the process ends even if
    it is killed; also proves the directory is writable before any compute."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._file = None
        self._created = False

    def __enter__(self) -> RunLock:
        try:
            self._created = not self.path.parent.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")
        except OSError as exc:
            raise ConfigError(f"cannot write to the run directory {self.path.parent}: {exc.strerror or exc}; "
                              f"choose another --out or fix its permissions") from exc
        try:
            import fcntl
        except ImportError:   # not POSIX: no lock, the writability check still happened
            return self
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(f"{self.path.parent} is in use by another training process (pid {owner}); "
                              f"wait for it to stop or use another --out") from exc
        except OSError:       # a filesystem without flock (some network mounts): go on unlocked
            return self
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is None:
            return
        try:   # a directory this lock created and nothing else used (input refused): leave no trace
            if self._created and [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                self.path.unlink()
                self.path.parent.rmdir()
        except OSError:
            pass
        self._file.close()   # closing releases the flock
        self._file = None
