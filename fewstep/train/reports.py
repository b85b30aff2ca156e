"""What a run shows of its model while it trains: sample grids, or what its dataset asks for instead.

The trainer calls a report at ``train.sample_kimg`` intervals (:meth:`RunReport.interval`) and once at
the end (:meth:`RunReport.final`). The report is the dataset's to choose: a dataset with a ``run_report``
attribute (a callable taking a :class:`ReportContext`) provides its own; otherwise point data
(``DataSpec.kind == "points"``, ``toy2d``) gets :class:`PointsReport` (sliced Wasserstein per NFE into
``metrics.json`` and a scatter plot) and images get :class:`SampleGrids`. So the trainer has no branch
on the kind of data.
Both methods are collective (call them on every rank: under FSDP2 the weights are gathered); only rank
0 writes. A report that cannot be written (a full disk) is a warning, never the end of training.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from fewstep.config import RunConfig
from fewstep.files import describe_os_error
from fewstep.images import make_grid
from fewstep.plots import step_label, write_grid
from fewstep.sample import output_decoder, sample, sampling_autocast
from fewstep.train.status import StatusLog
from fewstep.train.trackers import Trackers


@dataclasses.dataclass
class ReportContext:
    """What a report needs from the run.

    Attributes:
        sampling_objective: the objective to sample with on rank 0 (``None`` elsewhere; collective).
        dataset: the training dataset (its ``spec``; a report may load the test split from ``cfg.data``).
        resume: the command that resumes the run (for messages).
    """

    cfg: RunConfig
    dataset: Any
    run_dir: Path
    device: torch.device
    sampling_objective: Callable[[], torch.nn.Module | None]
    status: StatusLog
    trackers: Trackers
    resume: str


class RunReport(Protocol):
    def interval(self, tag: str, step: int) -> None: ...

    def final(self, step: int) -> None: ...


def run_report(ctx: ReportContext) -> RunReport:
    """The dataset's own report (its ``run_report(ctx)``), else the one for its kind of data."""
    default = PointsReport if ctx.dataset.spec.kind == "points" else SampleGrids
    return getattr(ctx.dataset, "run_report", default)(ctx)


class SampleGrids:
    """``samples/kimg<kimg>.png`` at intervals and ``samples/final.png`` at the end: one labelled block per
    ``sample.nfe``, seeds 0 … ``sample.num_images`` − 1, with ``sample.weights``, also sent to the trackers."""

    def __init__(self, ctx: ReportContext):
        self.ctx = ctx
        self.to_pixels = output_decoder(ctx.cfg.data, ctx.dataset.spec, device=ctx.device)   # VAE decode (lazy)

    def interval(self, tag: str, step: int) -> None:
        self._grid(tag, step)

    def final(self, step: int) -> None:
        self._grid("final", step)

    def _grid(self, tag: str, step: int) -> None:
        ctx, s = self.ctx, self.ctx.cfg.sample
        objective = ctx.sampling_objective()
        if objective is None:   # not rank 0
            return
        seeds = list(range(s.num_images))
        autocast = sampling_autocast(ctx.device, ctx.cfg)
        blocks = [self.to_pixels(sample(objective, seeds, nfe, weights=s.weights, guidance=s.guidance,
                                        autocast=autocast).images) for nfe in s.nfe]
        try:
            write_grid(ctx.run_dir / "samples" / f"{tag}.png", blocks, [step_label(n) for n in s.nfe],
                       title=f"{tag}: seeds 0–{len(seeds) - 1}, {s.weights} weights")
            ctx.trackers.log_image(f"samples/{tag}", make_grid(blocks), step)
        except OSError as exc:
            ctx.status.event({"event": "grid_failed", "error": str(exc)},
                             f"sample grid {tag} not written: {describe_os_error(exc)}")


class PointsReport:
    """For point data (``toy2d``): nothing at intervals; at the end ``metrics.json`` (sliced Wasserstein-2
    per ``sample.nfe`` against held-out test points, and the noise floor) and ``samples/scatter.png``
    (:func:`fewstep.evaluate_points.evaluate_points`)."""

    def __init__(self, ctx: ReportContext):
        self.ctx = ctx

    def interval(self, tag: str, step: int) -> None:
        pass

    def final(self, step: int) -> None:
        from fewstep.data import load_dataset
        from fewstep.evaluate_points import evaluate_points

        ctx, s = self.ctx, self.ctx.cfg.sample
        objective = ctx.sampling_objective()
        if objective is None:
            return
        held_out = load_dataset(dataclasses.replace(ctx.cfg.data, split="test"))
        try:
            evaluate_points(objective, held_out, ctx.run_dir, nfes=s.nfe, num=s.num_images, weights=s.weights,
                            guidance=s.guidance)
        except OSError as exc:
            ctx.status.event({"event": "metrics_failed", "error": str(exc)},
                             f"metrics.json and the scatter plot not written: {describe_os_error(exc)}; free "
                             f"space and run `{ctx.resume}` again to write them")
