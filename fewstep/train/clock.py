"""When things happen in a run: intervals counted in images, and the wall-clock training budget."""
from __future__ import annotations

import math
import time


class Every:
    """An interval of ``kimg`` thousand images (status lines, sample grids, checkpoints).

    :meth:`due` says whether ``nimg`` images reached the next multiple of the interval; :meth:`passed`
    moves the mark past ``nimg``. A zero interval is never due.
    """

    def __init__(self, kimg: float, nimg: int):
        self.interval = kimg * 1000
        self.passed(nimg)

    def due(self, nimg: int) -> bool:
        return nimg >= self.next

    def passed(self, nimg: int) -> None:
        """The next mark: the first multiple of the interval after ``nimg`` (∞ for a zero interval)."""
        self.next = (math.floor(nimg / self.interval) + 1) * self.interval if self.interval > 0 else math.inf


class TrainClock:
    """Training seconds summed over resumes (``train.max_minutes`` counts them).

    Each invocation's clock starts after its first step, so compiling and warm-up are not counted.

    Args:
        prior_seconds: seconds trained before this invocation (from the checkpoint).
        max_minutes: the budget, or ``None`` for none.
    """

    def __init__(self, prior_seconds: float, max_minutes: float | None):
        self.prior = prior_seconds
        self.budget = max_minutes * 60 if max_minutes is not None else math.inf
        self._start: float | None = None

    def step_done(self) -> None:
        """Start this invocation's clock after its first step (later calls change nothing)."""
        self._start = self._start or time.time()

    def seconds(self) -> float:
        return self.prior + (time.time() - self._start if self._start is not None else 0.0)

    @property
    def spent_before(self) -> bool:
        """The budget was spent by earlier invocations: nothing to train."""
        return self.prior >= self.budget

    def past_budget(self) -> bool:
        """The budget is spent (never before this invocation's first step has finished)."""
        return self._start is not None and self.seconds() >= self.budget
