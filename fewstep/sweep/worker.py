"""One sweep member, start to finish: train (resuming an interrupted run), evaluate every NFE, draw its
sample grid. The sweep runs it in its own process, or as a subprocess::

    python -m fewstep.sweep SWEEP_DIR MEMBER [--eval-batch N]

which exits 0 when the member is finished, 143/130 when SIGTERM/SIGINT stopped it (checkpoint written;
rerun to resume) and 1 on an error. Files, in ``SWEEP_DIR/MEMBER/``: the run itself (``config.json``,
``log.jsonl``, ``checkpoint-*``), ``eval.json`` (written last, atomically: its presence marks the member
finished) and, for image data, ``fid.json`` (the full evaluation record); ``SWEEP_DIR/samples-MEMBER.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep.checkpoints import latest_checkpoint
from fewstep.config import RunConfig
from fewstep.files import write_json
from fewstep.sweep.spec import POINTS_METRIC, SPEC_FILE, Member, SweepSpec, member_config, spec_from_dict

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


@dataclass
class MemberState:
    """Where one member stands on disk.

    Attributes:
        trained: the newest checkpoint reached ``train.total_kimg`` or the ``train.max_minutes`` budget.
        evaluated: ``eval.json`` belongs to that checkpoint (and the sample grid exists).
        kimg, step: of the newest checkpoint (0 without one).
    """

    trained: bool
    evaluated: bool
    kimg: float = 0.0
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.trained and self.evaluated


def reference_path(sweep_dir: Path, spec: SweepSpec) -> Path:
    """The reference statistics members are scored against (``spec.ref`` or one made in the sweep)."""
    return Path(spec.ref) if spec.ref else sweep_dir / f"reference-{spec.metric}.npz"


def grid_path(sweep_dir: Path, member: Member) -> Path:
    return sweep_dir / f"samples-{member.name}.png"


def training_done(manifest: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a checkpoint manifest is the end of training: ``total_kimg`` reached or the budget spent."""
    if int(manifest["nimg"]) >= round(cfg.train.total_kimg * 1000):
        return True
    budget = cfg.train.max_minutes
    return budget is not None and float(manifest.get("train_seconds", 0.0)) >= budget * 60


def member_state(sweep_dir: Path, spec: SweepSpec, member: Member, cfg: RunConfig) -> MemberState:
    """Read a member's progress from its directory (sizes checked, not hashes: ``train`` verifies fully)."""
    run_dir = sweep_dir / member.name
    if not run_dir.is_dir():
        return MemberState(False, False)
    ckpt = latest_checkpoint(run_dir, hashes=False, report=lambda message: None)
    if ckpt is None:
        return MemberState(False, False)
    trained = training_done(ckpt.manifest, cfg)
    record = read_json(run_dir / EVAL_FILE)
    evaluated = (trained and record is not None and record.get("checkpoint_step") == ckpt.step
                 and grid_path(sweep_dir, member).is_file())
    return MemberState(trained, evaluated, float(ckpt.field("kimg")), ckpt.step)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_member(sweep_dir: str | os.PathLike, spec: SweepSpec, name: str, *, eval_batch: int | None = None,
               show_progress: bool = False) -> str:
    """Bring member ``name`` to finished: train unless done, evaluate unless current.

    Returns:
        ``"finished"``, or the signal name (``"SIGTERM"``/``"SIGINT"``) that stopped its training.
    """
    from fewstep.train import train

    sweep_dir = Path(sweep_dir)
    member = spec.member(name)
    cfg = member_config(spec, member, sweep_dir)
    state = member_state(sweep_dir, spec, member, cfg)
    if not state.trained:
        if state.step:
            log.info(f"{name}: resuming at {state.kimg:.3f} kimg (step {state.step})")
        result = train(cfg, sweep_dir / name, show_progress=show_progress)
        if result.stopped:
            return result.stopped
        state = member_state(sweep_dir, spec, member, cfg)
    if not state.evaluated:
        evaluate_member(sweep_dir, spec, member, eval_batch=eval_batch)
    return "finished"


def evaluate_member(sweep_dir: Path, spec: SweepSpec, member: Member, *, eval_batch: int | None = None) -> dict[str, Any]:
    """Score the member's newest checkpoint at every NFE with ``spec.metric`` and draw its sample grid;
    writes ``eval.json`` last. Returns its body."""
    from fewstep.build import load_objective

    run_dir = sweep_dir / member.name
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    objective, cfg, ckpt = load_objective(run_dir, device=device)
    weights, guidance = cfg.sample.weights, cfg.sample.guidance
    if spec.metric == POINTS_METRIC:
        from fewstep.data import load_dataset
        from fewstep.evaluate import evaluate_points

        held_out = load_dataset(dataclasses.replace(cfg.data, split="test"))
        detail = evaluate_points(objective, held_out, run_dir, nfes=spec.nfe, num=spec.num, weights=weights,
                                 guidance=guidance)
        scores = detail["sliced_wasserstein"]
        if detail["scatter"] is not None:   # drawn when matplotlib is installed
            shutil.copyfile(run_dir / "samples" / "scatter.png", grid_path(sweep_dir, member))
        extra = {"floor": detail["test_reference_floor"]}
    else:
        import fewstep.metrics.classifier  # noqa: F401  (registers fmnist-classifier)
        from fewstep.eval import evaluate_fid

        batch = eval_batch or (256 if device.type == "cuda" else 64)
        detail = evaluate_fid(run_dir, spec.nfe, spec.num, reference_path(sweep_dir, spec), extractor=spec.metric,
                              batch=batch, out=run_dir / "fid.json", show_progress=False)
        scores = detail["fid"]
        write_grid(objective, spec, grid_path(sweep_dir, member), weights, guidance,
                   autocast=device.type == "cuda" and cfg.train.precision == "bf16")
        extra = {"sample_images_per_second": detail["images_per_second"], "evaluations": detail["evaluations"]}
    body = {"metric": spec.metric, "nfe": list(spec.nfe), "num": spec.num, "scores": scores,
            "checkpoint_step": ckpt.step, "kimg": ckpt.field("kimg"),
            "train_seconds": ckpt.manifest.get("train_seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds": round(time.perf_counter() - t0, 2), **extra}
    write_json(run_dir / EVAL_FILE, body)
    log.info(f"{member.name}: " + ", ".join(f"{spec.metric} {k} NFE {v:.4g}" for k, v in scores.items()))
    return body


def write_grid(objective: Any, spec: SweepSpec, path: Path, weights: str, guidance: float | None,
               autocast: bool) -> None:
    """One block of ``spec.grid`` images (seeds 0 … grid − 1) per NFE, top to bottom."""
    from fewstep.images import to_uint8
    from fewstep.plots import step_label, write_grid as write_labelled_grid
    from fewstep.sample import sample

    seeds = list(range(spec.grid))
    blocks = [to_uint8(sample(objective, seeds, nfe, weights=weights, guidance=guidance, batch_size=256,
                              autocast=autocast).images) for nfe in spec.nfe]
    member = path.stem[len("samples-"):]
    write_labelled_grid(path, blocks, [step_label(n) for n in spec.nfe],
                        title=f"{member}: seeds 0–{spec.grid - 1}, {weights} weights")


def load_saved_spec(sweep_dir: Path) -> SweepSpec:
    """The spec saved in a sweep directory (written by the sweep before any member starts)."""
    path = sweep_dir / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: start members through `fewstep sweep`")
    return spec_from_dict(json.loads(path.read_text()), str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fewstep.sweep", description="Run one sweep member.")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("member")
    ap.add_argument("--eval-batch", type=int, default=None)
    args = ap.parse_args(argv)
    spec = load_saved_spec(args.sweep_dir)
    from fewstep.logs import setup_plain_logging

    setup_plain_logging()   # plain lines on stdout: the sweep sends them to MEMBER/worker.log
    outcome = run_member(args.sweep_dir, spec, args.member, eval_batch=args.eval_batch)
    return 0 if outcome == "finished" else 128 + int(getattr(signal, outcome, signal.SIGTERM))
