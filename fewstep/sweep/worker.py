"""One sweep unit (a member trained with one seed), start to finish: train (resuming an interrupted run),
evaluate the EMA weights every ``eval_every_kimg`` on the way (the learning curve) and at the end, and
draw the member's sample grid (first seed). The sweep runs it in its own process, or as a subprocess::

    python -m fewstep.sweep SWEEP_DIR MEMBER --seed K [--eval-batch N]

which exits 0 when the unit is finished, 143/130 when SIGTERM/SIGINT stopped it (checkpoint written;
rerun to resume) and 1 on an error. Files, in ``SWEEP_DIR/MEMBER/seed-K/``: the run itself
(``config.json``, ``log.jsonl``, ``checkpoint-*``), ``curve.jsonl`` (one line per evaluation: images,
training seconds, TFLOP, metric per NFE; rewritten atomically), ``eval.json`` (the final evaluation,
written last, atomically: its presence marks the unit finished) and, for image data, ``fid.json`` (the full
evaluation record; intermediate ones under ``evals/``); ``SWEEP_DIR/samples-MEMBER.png``.

Intermediate evaluations train in segments: ``train`` is called with ``train.total_kimg`` set to the next
evaluation point (a resumable change), the point's checkpoint is evaluated, and training resumes from it
exactly (weights, EMAs, optimizer, RNG states, data order), so the run is the one an uninterrupted
training would have produced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
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
from fewstep.files import write_atomic, write_json
from fewstep.sweep.spec import POINTS_METRIC, SPEC_FILE, Member, SweepSpec, member_config, spec_from_dict

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
CURVE_FILE = "curve.jsonl"


@dataclass
class UnitState:
    """Where one unit stands on disk.

    Attributes:
        trained: the newest checkpoint reached ``train.total_kimg`` or the ``train.max_minutes`` budget.
        evaluated: ``eval.json`` belongs to that checkpoint and the spec's metrics (and the sample grid exists
            for the first seed).
        kimg, step: of the newest checkpoint (0 without one).
    """

    trained: bool
    evaluated: bool
    kimg: float = 0.0
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.trained and self.evaluated


def unit_dir(sweep_dir: Path, member: Member, seed: int) -> Path:
    """``<sweep>/<member>/seed-<seed>``: the run directory of one unit."""
    return Path(sweep_dir) / member.name / f"seed-{seed}"


def unit_label(member: Member | str, seed: int) -> str:
    return f"{member if isinstance(member, str) else member.name}/seed-{seed}"


def reference_path(sweep_dir: Path, spec: SweepSpec, metric: str | None = None) -> Path:
    """The reference statistics a metric is scored against (``spec.ref`` or one made in the sweep)."""
    metric = metric or spec.metric
    if spec.ref:
        return Path(spec.ref)
    tag = "" if spec.protocol == "clean" else f"-{spec.protocol}"
    return Path(sweep_dir) / f"reference-{metric}{tag}.npz"


def grid_path(sweep_dir: Path, member: Member) -> Path:
    return Path(sweep_dir) / f"samples-{member.name}.png"


def training_done(manifest: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a checkpoint manifest is the end of training: ``total_kimg`` reached or the budget spent."""
    if int(manifest["nimg"]) >= round(cfg.train.total_kimg * 1000):
        return True
    budget = cfg.train.max_minutes
    return budget is not None and float(manifest.get("train_seconds", 0.0)) >= budget * 60


def unit_state(sweep_dir: Path, spec: SweepSpec, member: Member, seed: int, cfg: RunConfig) -> UnitState:
    """Read a unit's progress from its directory (sizes checked, not hashes: ``train`` verifies fully)."""
    run_dir = unit_dir(sweep_dir, member, seed)
    if not run_dir.is_dir():
        return UnitState(False, False)
    ckpt = latest_checkpoint(run_dir, hashes=False, report=lambda message: None)
    if ckpt is None:
        return UnitState(False, False)
    trained = training_done(ckpt.manifest, cfg)
    record = read_json(run_dir / EVAL_FILE)
    evaluated = (trained and record is not None and record.get("checkpoint_step") == ckpt.step
                 and list(record.get("metrics", [])) == list(spec.metrics)
                 and (seed != spec.seeds[0] or grid_path(sweep_dir, member).is_file()))
    return UnitState(trained, evaluated, float(ckpt.field("kimg")), ckpt.step)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_curve(run_dir: Path) -> list[dict]:
    """The evaluations recorded in ``curve.jsonl``, in training order (none if missing)."""
    path = Path(run_dir) / CURVE_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return sorted(out, key=lambda r: r["nimg"])


def add_curve_point(run_dir: Path, point: dict) -> None:
    """Record one evaluation (replacing one of the same checkpoint step), rewriting the file atomically."""
    points = [p for p in read_curve(run_dir) if p["step"] != point["step"]] + [point]
    write_atomic(Path(run_dir) / CURVE_FILE, "".join(json.dumps(p) + "\n" for p in sorted(points, key=lambda r: r["nimg"])))


def evaluation_points(spec: SweepSpec, cfg: RunConfig) -> list[float]:
    """The intermediate evaluation targets in kimg: multiples of ``eval_every_kimg`` below the run's end."""
    every = spec.eval_every_kimg
    if every is None:
        return []
    end = cfg.train.total_kimg
    return [k * every for k in range(1, int(math.ceil(end / every))) if k * every < end - 1e-9]


def run_unit(sweep_dir: str | os.PathLike, spec: SweepSpec, name: str, seed: int, *, eval_batch: int | None = None,
             show_progress: bool = False) -> str:
    """Bring unit (member ``name``, ``seed``) to finished: train unless done (stopping at every evaluation
    point that has no curve entry yet to evaluate it), evaluate the end unless current.

    Returns:
        ``"finished"``, or the signal name (``"SIGTERM"``/``"SIGINT"``) that stopped its training.
    """
    from fewstep.train import train

    sweep_dir = Path(sweep_dir)
    member = spec.member(name)
    cfg = member_config(spec, member, seed, sweep_dir)
    run_dir = unit_dir(sweep_dir, member, seed)
    label = unit_label(member, seed)
    points = evaluation_points(spec, cfg)
    resumed_logged = False
    while True:
        state = unit_state(sweep_dir, spec, member, seed, cfg)
        if state.trained:
            break
        done = {round(p["target_kimg"], 6) for p in read_curve(run_dir) if p.get("target_kimg") is not None}
        # Points not yet evaluated that training has not passed (a checkpoint lands within one batch of a
        # point); one passed without a checkpoint (e.g. by an earlier run without points) is gone.
        reach = cfg.train.batch / 1000
        pending = [t for t in points if round(t, 6) not in done and t + reach > state.kimg + 1e-9]
        if pending and state.step and state.kimg >= pending[0] - 1e-9:    # at an evaluation point
            known = next((p for p in read_curve(run_dir) if p["step"] == state.step), None)
            if known is not None:   # evaluated already (the end of a shorter budget): it is this point too
                add_curve_point(run_dir, {**known, "target_kimg": pending[0]})
            else:
                evaluate_unit(sweep_dir, spec, member, seed, eval_batch=eval_batch, target_kimg=pending[0])
            continue
        if state.step and not resumed_logged:   # progress from an earlier invocation, not our own segment
            log.info(f"{label}: resuming at {state.kimg:.3f} kimg (step {state.step})")
        resumed_logged = True
        segment = cfg if not pending else dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, total_kimg=pending[0]))
        result = train(segment, run_dir, show_progress=show_progress)
        if result.stopped:
            return result.stopped
        if pending and result.budget_reached:   # the budget ran out before the point: the end is the end
            break
    state = unit_state(sweep_dir, spec, member, seed, cfg)
    if not state.evaluated:
        evaluate_unit(sweep_dir, spec, member, seed, eval_batch=eval_batch, target_kimg=None)
    return "finished"


def evaluate_unit(sweep_dir: Path, spec: SweepSpec, member: Member, seed: int, *, eval_batch: int | None = None,
                  target_kimg: float | None = None) -> dict[str, Any]:
    """Score the unit's newest checkpoint (EMA weights) at every NFE with every metric and add it to the
    learning curve. The final evaluation (``target_kimg`` None) also draws the member's grid (first seed)
    and writes ``eval.json`` last; returns the curve point."""
    from fewstep.build import load_objective, training_flops_per_image

    run_dir = unit_dir(sweep_dir, member, seed)
    final = target_kimg is None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    objective, cfg, ckpt = load_objective(run_dir, device=device)
    weights, guidance = cfg.sample.weights, cfg.sample.guidance
    per_image = training_flops_per_image(objective)
    extra: dict[str, Any] = {}
    if spec.metrics == (POINTS_METRIC,):
        from fewstep.data import load_dataset
        from fewstep.evaluate_points import evaluate_points

        held_out = load_dataset(dataclasses.replace(cfg.data, split="test"))
        detail = evaluate_points(objective, held_out, run_dir, nfes=spec.nfe, num=spec.num, weights=weights,
                                 guidance=guidance)
        scores = {POINTS_METRIC: detail["sliced_wasserstein"]}
        extra["floor"] = detail["test_reference_floor"]
        if final and seed == spec.seeds[0] and detail["scatter"] is not None:   # drawn when matplotlib is installed
            shutil.copyfile(run_dir / "samples" / "scatter.png", grid_path(sweep_dir, member))
    else:
        import fewstep.metrics.classifier  # noqa: F401  (registers fmnist-classifier)
        from fewstep.evaluate_images import evaluate_fid
        from fewstep.sample import sampling_autocast

        batch = eval_batch or (256 if device.type == "cuda" else 64)
        out = run_dir / "fid.json" if final else run_dir / "evals" / f"fid-{ckpt.step:08d}.json"
        first, *others = spec.metrics
        detail = evaluate_fid(run_dir, spec.nfe, spec.num, reference_path(sweep_dir, spec, first), extractor=first,
                              also=[(m, reference_path(sweep_dir, spec, m)) for m in others], protocol=spec.protocol,
                              batch=batch, out=out, show_progress=False)
        scores = {first: detail["fid"], **{m: detail["also"][m]["fid"] for m in others}}
        if final and seed == spec.seeds[0]:
            write_grid(objective, spec, grid_path(sweep_dir, member), weights, guidance,
                       autocast=sampling_autocast(device, cfg))
        extra.update(sample_images_per_second=detail["images_per_second"], evaluations=detail["evaluations"])
    nimg = int(ckpt.field("nimg"))
    point = {"step": ckpt.step, "nimg": nimg, "kimg": nimg / 1000, "target_kimg": target_kimg,
             "train_seconds": ckpt.manifest.get("train_seconds"),
             "tflop": nimg * per_image / 1e12 if per_image else None, "scores": scores}
    add_curve_point(run_dir, point)
    label = unit_label(member, seed)
    if not final:
        log.info(f"{label} at {nimg / 1000:.1f} kimg: " + _scores_text(scores))
        return point
    body = {"metrics": list(spec.metrics), "protocol": spec.protocol, "nfe": list(spec.nfe), "num": spec.num,
            "seed": seed, "scores": scores, "checkpoint_step": ckpt.step, "kimg": ckpt.field("kimg"), "nimg": nimg,
            "train_seconds": ckpt.manifest.get("train_seconds"), "flops_per_image": per_image,
            "tflop": point["tflop"], "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "seconds": round(time.perf_counter() - t0, 2), **extra}
    write_json(run_dir / EVAL_FILE, body)
    log.info(f"{label}: " + _scores_text(scores))
    return point


def _scores_text(scores: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{m} " + ", ".join(f"{k} NFE {v:.4g}" for k, v in by_nfe.items()) for m, by_nfe in scores.items())


def write_grid(objective: Any, spec: SweepSpec, path: Path, weights: str, guidance: float | None,
               autocast: bool) -> None:
    """One labelled block of ``spec.grid`` images (seeds 0 … grid − 1) per NFE, top to bottom."""
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
    ap = argparse.ArgumentParser(prog="python -m fewstep.sweep", description="Run one sweep unit (member, seed).")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("member")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the sweep's first)")
    ap.add_argument("--eval-batch", type=int, default=None)
    args = ap.parse_args(argv)
    spec = load_saved_spec(args.sweep_dir)
    seed = spec.seeds[0] if args.seed is None else args.seed
    from fewstep.logs import setup_plain_logging

    setup_plain_logging()   # plain lines on stdout: the sweep sends them to MEMBER/seed-K/worker.log
    outcome = run_unit(args.sweep_dir, spec, args.member, seed, eval_batch=args.eval_batch)
    return 0 if outcome == "finished" else 128 + int(getattr(signal, outcome, signal.SIGTERM))
