"""A sweep's report, rebuilt from the member directories: ``results.csv``, ``results.md``,
``metric_vs_nfe.png`` and ``loss_curves.png`` (one panel per member, each on its own scale, since the
objectives' losses are not comparable).

Per member: the metric at each NFE (``eval.json``); kimg and steps of the evaluated checkpoint; training
images/s (median of the status records in ``log.jsonl``, so warm-up and checkpoint ticks do not count);
device-minutes (training wall-clock summed over resumes, from the checkpoint manifest, × 1 process);
peak GPU memory (the status log's maximum ``peak_mem_gib``; none on a CPU).
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.checkpoints import latest_checkpoint
from fewstep.files import write_atomic
from fewstep.registry import objectives
from fewstep.train.status import status_records
from fewstep.sweep.spec import POINTS_METRIC, SweepSpec
from fewstep.sweep.worker import EVAL_FILE, grid_path, read_json

log = logging.getLogger(__name__)

METRIC_NAMES = {POINTS_METRIC: "SW2", "inception": "FID"}


@dataclass
class Row:
    """One member's line of the report (``None`` where a number is not available)."""

    member: str
    objective: str
    overrides: str
    status: str
    scores: dict[str, float] = field(default_factory=dict)
    kimg: float | None = None
    steps: int | None = None
    img_per_s: float | None = None
    minutes: float | None = None
    peak_mem_gib: float | None = None
    device: str | None = None
    floor: float | None = None
    losses: list[tuple[float, float]] = field(default_factory=list)
    loss_key: str = "loss"
    init_from: str = ""


def metric_label(metric: str) -> str:
    return METRIC_NAMES.get(metric, f"FD-{metric}")


def progress_key(objective: str, records: list[dict]) -> str:
    """The objective's ``progress_log`` entry if its status records have it, else ``"loss"``."""
    try:
        key = getattr(objectives.get(objective), "progress_log", "loss")
    except Exception:   # an objective whose plugin is gone still gets its curve
        key = "loss"
    return key if any(key in r for r in records) else "loss"


def collect(sweep_dir: Path, spec: SweepSpec, failed: dict[str, str] | None = None) -> list[Row]:
    """One :class:`Row` per member, from what is on disk."""
    rows = []
    for m in spec.members:
        run_dir = sweep_dir / m.name
        ev = read_json(run_dir / EVAL_FILE)
        ckpt = latest_checkpoint(run_dir, hashes=False, report=lambda message: None) if run_dir.is_dir() else None
        status = ("ok" if ev is not None and ckpt is not None and ev.get("checkpoint_step") == ckpt.step else
                  f"failed: {failed[m.name]}" if failed and m.name in failed else
                  "not started" if ckpt is None else "incomplete")
        records = status_records(run_dir)
        speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
        peaks = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
        key = progress_key(m.objective, records)
        losses = {float(r["kimg"]): float(r[key]) for r in records if key in r}
        seconds = ckpt.manifest.get("train_seconds") if ckpt else None
        rows.append(Row(member=m.name, objective=m.objective, overrides=" ".join(m.overrides), status=status,
                        scores={str(k): float(v) for k, v in ev["scores"].items()} if status == "ok" else {},
                        kimg=float(ckpt.field("kimg")) if ckpt else None, steps=ckpt.step if ckpt else None,
                        img_per_s=statistics.median(speeds) if speeds else None,
                        minutes=seconds / 60 if seconds is not None else None,
                        peak_mem_gib=max(peaks) if peaks else None, device=(ev or {}).get("device"),
                        floor=(ev or {}).get("floor"),
                        losses=sorted(losses.items()), loss_key=key, init_from=m.init_from))
    return rows


def write_csv(path: Path, spec: SweepSpec, rows: list[Row]) -> None:
    """``results.csv``: one row per member; empty cells where a number is missing."""
    nfe_cols = [f"nfe_{n}" for n in spec.nfe]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["member", "objective", "overrides", "metric", *nfe_cols, "kimg", "steps", "img_per_s",
                    "train_minutes", "peak_mem_gib", "device", "status"])
        for r in rows:
            numbers = [*(r.scores.get(str(n)) for n in spec.nfe), r.kimg, r.steps, r.img_per_s, r.minutes,
                       r.peak_mem_gib]
            w.writerow([r.member, r.objective, r.overrides, spec.metric, *map(_num, numbers), r.device or "", r.status])


def _num(v: float | int | None) -> str:
    return "" if v is None else str(v) if isinstance(v, int) else f"{v:.6g}"


def markdown(spec: SweepSpec, rows: list[Row]) -> str:
    """``results.md``: the table (best value per NFE in bold; lower is better) and what was measured."""
    label = metric_label(spec.metric)
    gpu = any(r.device and r.device != "cpu" for r in rows)
    budget = [f"{spec.kimg:g} kimg" if spec.kimg else "", f"{spec.minutes:g} min" if spec.minutes else ""]
    budget = " or ".join(b for b in budget if b) or "the recipe's length"
    devices = sorted({r.device for r in rows if r.device})
    what = label if spec.metric in label else f"{label} ({spec.metric})"
    lines = [f"# Sweep: recipe `{spec.recipe}`", "",
             f"{what} of {spec.num} samples per NFE (seeds 0–{spec.num - 1}), lower is better; "
             f"training budget per member: {budget}; seed {spec.seed}"
             + (f"; shared overrides: `{' '.join(spec.overrides)}`" if spec.overrides else "")
             + (f"; device: {', '.join(devices)}" if devices else "") + ".", ""]
    head = ["member", *(f"{label} @{n} NFE" for n in spec.nfe), "kimg", "img/s", "GPU-min" if gpu else "CPU-min",
            "peak GiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    best = {str(n): min((r.scores[str(n)] for r in rows if math.isfinite(r.scores.get(str(n), math.nan))),
                        default=None) for n in spec.nfe}
    for r in rows:
        name = f"{r.member}" + (f" (from {r.init_from})" if r.init_from else "") + (f" (`{r.overrides}`)" if r.overrides else "")
        cells = []
        for n in spec.nfe:
            v = r.scores.get(str(n))
            text = "–" if v is None else f"{v:.4g}"
            cells.append(f"**{text}**" if v is not None and v == best[str(n)] and len(rows) > 1 else text)
        if r.status != "ok":
            cells[0] = f"{r.status}"
        lines.append("| " + " | ".join([name, *cells, _cell(r.kimg, ".1f"), _cell(r.img_per_s, ".0f"),
                                          _cell(r.minutes, ".3g"), _cell(r.peak_mem_gib, ".1f")]) + " |")
    floors = [r.floor for r in rows if r.floor is not None]
    if floors:
        lines += ["", f"Noise floor ({label} between two halves of the test data, {spec.num} points each): "
                  f"{floors[0]:.4g} (a perfect model scores about this; see fewstep/evaluate.py)."]
    lines += ["", "img/s: median training images per second over the status log; "
              f"{'GPU' if gpu else 'CPU'}-min: training wall-clock summed over resumes (members that ran side by "
              "side on one device shared it); peak GiB: peak GPU memory allocated by training.",
              "Files: `results.csv`, `metric_vs_nfe.png`, `loss_curves.png`, `samples-<member>.png` "
              "(one block per NFE, seeds 0–" f"{spec.grid - 1}), runs in `<member>/`.", ""]
    return "\n".join(lines)


def _cell(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def metric_chart(path: Path, metric: str, num: int, nfes: list[int] | tuple[int, ...],
                 scores: dict[str, dict[str, float]]) -> Path:
    """``metric_vs_nfe.png``: one line per member (member → NFE as a string → value), log NFE axis."""
    from fewstep.plots import Series, line_chart

    label = metric_label(metric)
    what = label if metric in label else f"{label} ({metric})"
    series = [Series(name, list(nfes), [s.get(str(n), math.nan) for n in nfes]) for name, s in scores.items()]
    return line_chart(path, series, title=f"{what} vs NFE, {num} samples per NFE",
                      xlabel="NFE (network evaluations per sample)", ylabel=f"{label} (lower is better)",
                      log_x=True, x_ticks=list(nfes))


def write_report(sweep_dir: Path, spec: SweepSpec, failed: dict[str, str] | None = None) -> list[Path]:
    """Write every report file from the member directories; returns their paths. Without matplotlib the
    two charts are left out with a warning naming the extra (the tables are still written)."""
    from fewstep.plots import Panel, PlotsUnavailable, Series, panel_chart

    rows = collect(sweep_dir, spec, failed)
    files = [sweep_dir / "results.csv", sweep_dir / "results.md"]
    write_csv(files[0], spec, rows)
    write_atomic(files[1], markdown(spec, rows))
    try:
        files.append(metric_chart(sweep_dir / "metric_vs_nfe.png", spec.metric, spec.num, spec.nfe,
                                  {r.member: r.scores for r in rows}))
        panels = [Panel(f"{r.member}: {r.loss_key}", r.loss_key,
                        [Series(r.member, [k for k, _ in r.losses], [v for _, v in r.losses])]) for r in rows]
        files.append(panel_chart(sweep_dir / "loss_curves.png", panels, xlabel="kimg (thousands of images seen)",
                                 title="training curves (each objective's progress entry, on its own scale)"))
    except PlotsUnavailable as exc:
        log.warning(f"metric_vs_nfe.png and loss_curves.png not written: {exc}")
    return files + [grid_path(sweep_dir, m) for m in spec.members if grid_path(sweep_dir, m).is_file()]



