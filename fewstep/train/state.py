"""Where a run stands: exactly the counters a checkpoint saves beside its tensors."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fewstep.checkpoints import Checkpoint


@dataclass
class TrainState:
    """The training position, saved in every checkpoint's manifest and restored on resume.

    Attributes:
        step: optimizer steps taken (applied or skipped).
        nimg: training images seen (global batch × steps).
        data_position: the batch stream's position (images drawn per rank, see ``BatchStream``).
        skipped_steps: steps skipped for a non-finite loss or gradient, over the whole run.
        bad_streak: skipped steps in a row up to now (``train.max_bad_steps`` of them stop the run).
        train_seconds: training wall-clock summed over resumes (``train.max_minutes`` counts it).
    """

    step: int = 0
    nimg: int = 0
    data_position: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    train_seconds: float = 0.0

    @property
    def kimg(self) -> float:
        return self.nimg / 1000

    def advance(self, batch: int, applied: bool) -> None:
        """Count one step of ``batch`` images whose update was ``applied`` (or skipped as bad)."""
        self.step, self.nimg = self.step + 1, self.nimg + batch
        if applied:
            self.bad_streak = 0
        else:
            self.skipped_steps, self.bad_streak = self.skipped_steps + 1, self.bad_streak + 1

    def manifest(self) -> dict[str, Any]:
        """The manifest fields (``kimg`` added for readers; ``step`` is the checkpoint's own)."""
        fields = asdict(self)
        del fields["step"]
        return {**fields, "kimg": self.kimg}

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> TrainState:
        """The state saved in ``ckpt`` (counters that older checkpoints lack start at 0)."""
        m = ckpt.manifest
        return cls(step=ckpt.step, nimg=int(ckpt.field("nimg")), data_position=int(ckpt.field("data_position")),
                   skipped_steps=int(m.get("skipped_steps", 0)), bad_streak=int(m.get("bad_streak", 0)),
                   train_seconds=float(m.get("train_seconds", 0.0)))
