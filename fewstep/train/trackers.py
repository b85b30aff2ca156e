"""Experiment trackers (``train.trackers``: ``tensorboard``, ``wandb``, … any of Accelerate's) for a run.

Rank 0 sends each tracker what ``log.jsonl`` holds: every numeric entry of each status record (loss and
its terms, grad norm, learning rate when it varies, img/s, s/kimg, TFLOP/s, MFU, peak memory) at its
optimizer step, the resolved config once as hyperparameters (flattened ``section.field`` keys), and
every sample grid as an image. The trackers are Accelerate's (``accelerate.tracking``), so their
names, extras and environment variables are Accelerate's: TensorBoard writes to ``RUN/tensorboard``,
wandb to the project ``train.tracker_project`` with the run directory's name (``WANDB_MODE=offline``
works without a network; a resumed run continues the same wandb run).

A tracker that cannot start, or fails while training (a full disk, a lost connection), is reported
once and switched off; training goes on (with several processes, rank 0 alone runs the trackers, so a
failure there must not stop it while the others wait). ``pip install 'fewstep[trackers]'`` installs TensorBoard and wandb.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

TRACKERS_EXTRA = "pip install 'fewstep[trackers]'"
SKIPPED = ("step", "time")   # the step is the tracker's x axis; wall-clock time is not a curve


def known_trackers() -> list[str]:
    """Names Accelerate has a tracker class for."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def check_trackers(names: Sequence[str]) -> None:
    """Unknown or uninstalled trackers fail here, before any compute, with the fix."""
    from fewstep.config import ConfigError
    from fewstep.registry import closest

    if not names:
        return
    from accelerate.utils import imports

    known = known_trackers()
    for name in names:
        if name not in known:
            hint = closest(name, known)
            raise ConfigError(f"unknown tracker {name!r} in train.trackers" + (f"; did you mean {hint[0]!r}?" if hint
                              else "") + f" (valid: {', '.join(known)})")
        available = getattr(imports, f"is_{name}_available", None)
        if available is not None and not available():
            package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
            how = TRACKERS_EXTRA if package else f"pip install {name.replace('_', '-')}"
            raise ConfigError(f"train.trackers asks for {name}, which is not installed; install it with {how}")


def _hparam(value: Any) -> bool | int | float | str:
    """A config value as a hyperparameter TensorBoard and wandb accept (lists and dicts as text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class Trackers:
    """The run's trackers on rank 0 (nothing elsewhere, or when ``names`` is empty).

    Args:
        names: tracker names (``train.trackers``).
        run_dir: the run directory (TensorBoard writes under it; wandb keeps its files there).
        config: the resolved config as a dict (``to_dict``), stored as hyperparameters.
        project: wandb's project (``train.tracker_project``).
        enabled: ``False`` on every rank but 0.
    """

    def __init__(self, names: Sequence[str], run_dir: Path, config: dict[str, Any], project: str = "fewstep",
                 enabled: bool = True):
        self.trackers: list[Any] = []
        if not enabled or not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        from fewstep.build import flatten_config

        run_dir = Path(run_dir)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls("tensorboard", str(run_dir))
            elif name == "wandb":   # one wandb run per run directory, continued on resume
                run_id = f"{run_dir.name}-{hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
                tracker = cls(project, name=run_dir.name, dir=str(run_dir), id=run_id, resume="allow")
            elif cls.requires_logging_directory:
                tracker = cls(run_dir.name, str(run_dir))
            else:
                tracker = cls(project)
            try:   # on rank 0 only: a failure here must not leave the other ranks waiting at a barrier
                tracker.start()
                tracker.store_init_configuration({k: _hparam(v) for k, v in flatten_config(config).items()})
            except Exception as exc:
                log.warning(f"tracker {name} could not start ({type(exc).__name__}: {exc}); training goes on "
                            "without it")
                continue
            self.trackers.append(tracker)

    def _each(self, what: str, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:   # a tracker never stops training
                log.warning(f"tracker {tracker.name} failed to {what} ({type(exc).__name__}: {exc}); it is switched "
                            "off for the rest of this run")
                self.trackers.remove(tracker)

    def log(self, record: dict[str, Any], step: int) -> None:
        """The numeric entries of a status record (as in ``log.jsonl``) at optimizer step ``step``."""
        if not self.trackers:
            return
        values = {k: float(v) for k, v in record.items()
                  if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._each("log", lambda t: t.log(values, step=step))

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """One (C, H, W) uint8 image (a sample grid) at optimizer step ``step``."""
        if not self.trackers:
            return
        image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        chw = image.cpu().numpy()

        def send(tracker: Any) -> None:
            if tracker.name == "tensorboard":            # SummaryWriter.add_images: (N, C, H, W)
                tracker.log_images({tag: chw[None]}, step=step)
            elif hasattr(tracker, "log_images"):          # wandb and the rest: a list of (H, W, C) images
                tracker.log_images({tag: [chw.transpose(1, 2, 0)]}, step=step)

        self._each("log an image", send)

    def finish(self) -> None:
        self._each("finish", lambda t: t.finish())
        self.trackers = []
