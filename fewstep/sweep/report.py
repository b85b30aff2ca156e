"""A sweep's report, rebuilt from the unit directories: ``results.csv``, ``results.md``,
``metric_vs_nfe.png``, ``loss_curves.png`` and, with intermediate evaluations, ``learning_curves.png``.

Per unit (member × training seed): the metric at each NFE (``eval.json``); kimg, steps and TFLOP of the
evaluated checkpoint; training images/s (median of the status records in ``log.jsonl``, so warm-up and
checkpoint ticks do not count); device-minutes (training wall-clock summed over resumes, from the
checkpoint manifest); peak GPU memory (the status log's maximum ``peak_mem_gib``; none on a CPU).
Per member: each metric's mean, standard deviation and 95 % interval over the seeds, and a rank that only
separates members whose intervals do not overlap (:mod:`fewstep.sweep.stats`).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.checkpoints import latest_checkpoint
from fewstep.files import write_atomic
from fewstep.registry import objectives
from fewstep.sweep.spec import POINTS_METRIC, SweepSpec
from fewstep.sweep.stats import Rank, Summary, rank, summarize
from fewstep.sweep.worker import EVAL_FILE, grid_path, read_curve, read_json, unit_dir, unit_label
from fewstep.train.status import status_records

log = logging.getLogger(__name__)

METRIC_NAMES = {POINTS_METRIC: "SW2", "inception": "FID"}


@dataclass
class Row:
    """One unit's line of the report (``None`` where a number is not available).

    ``scores`` maps metric → NFE (a string) → value."""

    member: str
    objective: str
    overrides: str
    seed: int
    status: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    kimg: float | None = None
    steps: int | None = None
    tflop: float | None = None
    img_per_s: float | None = None
    minutes: float | None = None
    peak_mem_gib: float | None = None
    device: str | None = None
    floor: float | None = None
    losses: list[tuple[float, float]] = field(default_factory=list)
    loss_key: str = "loss"
    curve: list[dict] = field(default_factory=list)


@dataclass
class MemberSummary:
    """A member over its seeds: ``scores`` metric → NFE → :class:`Summary`, ``ranks`` likewise → :class:`Rank`."""

    member: str
    objective: str
    overrides: str
    rows: list[Row]
    scores: dict[str, dict[str, Summary | None]] = field(default_factory=dict)
    ranks: dict[str, dict[str, Rank]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        ok = sum(r.status == "ok" for r in self.rows)
        if ok == len(self.rows):
            return "ok"
        failed = [r for r in self.rows if r.status.startswith("failed")]
        return (f"{ok}/{len(self.rows)} seeds done" + (f"; seed {failed[0].seed} {failed[0].status}" if failed else ""))

    def mean_of(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.rows if getattr(r, attr) is not None]
        return sum(values) / len(values) if values else None


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
    """One :class:`Row` per unit (seed-major, as the sweep runs them), from what is on disk."""
    rows = []
    for seed in spec.seeds:
        for m in spec.members:
            run_dir = unit_dir(sweep_dir, m, seed)
            ev = read_json(run_dir / EVAL_FILE)
            ckpt = latest_checkpoint(run_dir, hashes=False, report=lambda message: None) if run_dir.is_dir() else None
            label = unit_label(m, seed)
            ok = ev is not None and ckpt is not None and ev.get("checkpoint_step") == ckpt.step and \
                list(ev.get("metrics", [])) == list(spec.metrics)
            status = ("ok" if ok else f"failed: {failed[label]}" if failed and label in failed else
                      "not started" if ckpt is None else "incomplete")
            records = status_records(run_dir)
            speeds = [r["img_per_s"] for r in records if "img_per_s" in r]
            peaks = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
            key = progress_key(m.objective, records)
            losses = {float(r["kimg"]): float(r[key]) for r in records if key in r}
            seconds = ckpt.manifest.get("train_seconds") if ckpt else None
            rows.append(Row(member=m.name, objective=m.objective, overrides=" ".join(m.overrides), seed=seed,
                            status=status,
                            scores={metric: {str(k): float(v) for k, v in by_nfe.items()}
                                    for metric, by_nfe in ev["scores"].items()} if ok else {},
                            kimg=float(ckpt.field("kimg")) if ckpt else None, steps=ckpt.step if ckpt else None,
                            tflop=(ev or {}).get("tflop") if ok else None,
                            img_per_s=statistics.median(speeds) if speeds else None,
                            minutes=seconds / 60 if seconds is not None else None,
                            peak_mem_gib=max(peaks) if peaks else None, device=(ev or {}).get("device"),
                            floor=(ev or {}).get("floor"), losses=sorted(losses.items()), loss_key=key,
                            curve=read_curve(run_dir)))
    return rows


def summarize_members(spec: SweepSpec, rows: list[Row]) -> list[MemberSummary]:
    """Per member: mean/std/interval of each metric and NFE over its finished seeds, and the ranks."""
    out = []
    for m in spec.members:
        mine = [r for r in rows if r.member == m.name]
        s = MemberSummary(m.name, m.objective, " ".join(m.overrides), mine)
        for metric in spec.metrics:
            s.scores[metric] = {str(n): summarize([r.scores.get(metric, {}).get(str(n)) for r in mine
                                                   if r.status == "ok"]) for n in spec.nfe}
        out.append(s)
    for metric in spec.metrics:
        for n in spec.nfe:
            ranks = rank({s.member: s.scores[metric][str(n)] for s in out})
            for s in out:
                s.ranks.setdefault(metric, {})[str(n)] = ranks[s.member]
    return out


def _num(v: float | int | None) -> str:
    return "" if v is None else str(v) if isinstance(v, int) else f"{v:.6g}"


def write_csv(path: Path, spec: SweepSpec, rows: list[Row], members: list[MemberSummary]) -> None:
    """``results.csv``, long format: one line per (member, seed, metric, NFE) with its value, then one per
    (member, metric, NFE) with ``seed`` = ``mean``: the mean, std, 95 % interval, rank and seed count.
    Training numbers (kimg, TFLOP, minutes, …) are the unit's, or their mean over seeds."""
    head = ["member", "objective", "overrides", "seed", "metric", "protocol", "nfe", "value", "std", "ci95_low",
            "ci95_high", "rank", "n_seeds", "kimg", "steps", "tflop", "img_per_s", "train_minutes", "peak_mem_gib",
            "device", "status"]
    f = io.StringIO(newline="")   # the whole table in memory, then one atomic write
    w = csv.writer(f)
    w.writerow(head)
    for r in rows:
        for metric in spec.metrics:
            for n in spec.nfe:
                w.writerow([r.member, r.objective, r.overrides, r.seed, metric, spec.protocol, n,
                            _num(r.scores.get(metric, {}).get(str(n))), "", "", "", "", 1, _num(r.kimg),
                            _num(r.steps), _num(r.tflop), _num(r.img_per_s), _num(r.minutes),
                            _num(r.peak_mem_gib), r.device or "", r.status])
    for s in members:
        for metric in spec.metrics:
            for n in spec.nfe:
                st = s.scores[metric][str(n)]
                rk = s.ranks[metric][str(n)]
                speeds = [r.img_per_s for r in s.rows if r.img_per_s is not None]
                peaks = [r.peak_mem_gib for r in s.rows if r.peak_mem_gib is not None]
                w.writerow([s.member, s.objective, s.overrides, "mean", metric, spec.protocol, n,
                            _num(st.mean if st else None), _num(st.std if st else None),
                            _num(st.low if st else None), _num(st.high if st else None),
                            "" if rk.rank is None else str(rk), st.n if st else 0, _num(s.mean_of("kimg")), "",
                            _num(s.mean_of("tflop")), _num(statistics.median(speeds) if speeds else None),
                            _num(s.mean_of("minutes")), _num(max(peaks) if peaks else None),
                            next((r.device for r in s.rows if r.device), ""), s.status])
    write_atomic(path, f.getvalue())


def _cell(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _score_cell(st: Summary | None, rk: Rank) -> str:
    if st is None:
        return "–"
    text = f"{st.mean:.4g}" + (f" ± {st.half_width:.2g}" if st.half_width is not None else "")
    if rk.rank is not None:
        text += f" ({rk})"
    return f"**{text}**" if rk.rank == 1 else text


def best_lines(spec: SweepSpec, members: list[MemberSummary]) -> list[str]:
    """One line per metric and NFE naming the best member, or the tie."""
    lines = []
    for metric in spec.metrics:
        for n in spec.nfe:
            top = [s.member for s in members if s.ranks[metric][str(n)].rank == 1]
            label = f"{metric_label(metric)} @{n} NFE"
            if not top:
                lines.append(f"- {label}: not ranked (fewer than two seeds per member)")
            elif len(members) == 1:
                lines.append(f"- {label}: `{top[0]}` is the only member")
            elif len(top) == 1:
                lines.append(f"- {label}: best `{top[0]}` (its interval lies below every other member's)")
            else:
                lines.append(f"- {label}: tie between {', '.join(f'`{t}`' for t in top)} (their intervals overlap; "
                             "none is separated from the others)")
    return lines


def markdown(spec: SweepSpec, rows: list[Row], members: list[MemberSummary]) -> str:
    """``results.md``: what was measured, the table of means ± 95 % intervals with ranks (lower is better),
    who is best or tied, and the per-seed rows."""
    gpu = any(r.device and r.device != "cpu" for r in rows)
    devices = sorted({r.device for r in rows if r.device})
    what = ", ".join(metric_label(m) if m in metric_label(m) else f"{metric_label(m)} ({m})" for m in spec.metrics)
    seeds = ", ".join(map(str, spec.seeds))
    lines = [f"# Sweep: recipe `{spec.recipe}`", "",
             f"{what} of {spec.num} samples per NFE (sample seeds 0–{spec.num - 1}, {spec.protocol} protocol), "
             f"lower is better. Budget: {spec.budget_text()}. Training seeds: {seeds}"
             + (f"; learning curves every {spec.eval_every_kimg:g} kimg" if spec.eval_every_kimg else "")
             + (f"; shared overrides: `{' '.join(spec.overrides)}`" if spec.overrides else "")
             + (f"; device: {', '.join(devices)}" if devices else "") + ".", "",
             "Cells: mean over seeds ± half-width of its 95 % t-interval (rank). A member ranks ahead of another "
             "only when its interval lies entirely below the other's; `1=` is a shared place (a tie)."
             + (" With one seed there are no intervals and no ranks." if len(spec.seeds) == 1 else ""), ""]
    for metric in spec.metrics:
        label = metric_label(metric)
        head = ["member", *(f"{label} @{n} NFE" for n in spec.nfe), "kimg", "TFLOP", "img/s",
                "GPU-min" if gpu else "CPU-min", "peak GiB"]
        lines += [f"## {label}", ""] if len(spec.metrics) > 1 else []
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for s in members:
            source = spec.member(s.member).init_from
            name = s.member + (f" (from {source})" if source else "") + (f" (`{s.overrides}`)" if s.overrides else "")
            cells = [_score_cell(s.scores[metric][str(n)], s.ranks[metric][str(n)]) for n in spec.nfe]
            if s.status != "ok":
                cells[0] = f"{s.status}" + (f": {cells[0]}" if cells[0] != "–" else "")
            speeds = [r.img_per_s for r in s.rows if r.img_per_s is not None]
            peaks = [r.peak_mem_gib for r in s.rows if r.peak_mem_gib is not None]
            lines.append("| " + " | ".join([name, *cells, _cell(s.mean_of("kimg"), ".1f"), _cell(s.mean_of("tflop"), ".4g"),
                                              _cell(statistics.median(speeds) if speeds else None, ".0f"),
                                              _cell(s.mean_of("minutes"), ".3g"),
                                              _cell(max(peaks) if peaks else None, ".1f")]) + " |")
        lines.append("")
    lines += ["Best per NFE:", *best_lines(spec, members), ""]
    floors = [r.floor for r in rows if r.floor is not None]
    if floors:
        lines += [f"Noise floor (SW2 between two halves of the test data, {spec.num} points each): {floors[0]:.4g} "
                  "(a perfect model scores about this; see fewstep/evaluate_points.py).", ""]
    per_seed = ["member", "seed", *(f"{metric_label(m)} @{n}" for m in spec.metrics for n in spec.nfe), "kimg", "steps",
                "TFLOP", "img/s", "GPU-min" if gpu else "CPU-min", "status"]
    lines += ["## Per seed", "", "| " + " | ".join(per_seed) + " |",
              "|" + "|".join(["---", "---:"] + ["---:"] * (len(per_seed) - 3) + ["---"]) + "|"]
    for r in rows:
        values = [_cell(r.scores.get(m, {}).get(str(n)), ".4g") for m in spec.metrics for n in spec.nfe]
        lines.append("| " + " | ".join([r.member, str(r.seed), *values, _cell(r.kimg, ".1f"), _cell(r.steps, "d"),
                                          _cell(r.tflop, ".4g"), _cell(r.img_per_s, ".0f"), _cell(r.minutes, ".3g"),
                                          r.status]) + " |")
    lines += ["", "kimg, TFLOP, minutes: of the evaluated checkpoint (TFLOP: training model FLOPs, images seen × the "
              "objective's FLOPs per image), mean over seeds; img/s: median training images per second over the status "
              f"log; {'GPU' if gpu else 'CPU'}-min: training wall-clock summed over resumes (units that ran side by side "
              "on one device shared it); peak GiB: peak GPU memory allocated by training"
              + ("." if gpu else " (not measured on a CPU: –)."),
              "Files: `results.csv` (per-seed rows and the summaries), `metric_vs_nfe.png`, `loss_curves.png`"
              + (", `learning_curves.png`" if spec.eval_every_kimg else "")
              + f", `samples-<member>.png` (first seed; one block per NFE, sample seeds 0–{spec.grid - 1}), runs in "
              "`<member>/seed-<seed>/`.", ""]
    return "\n".join(lines)


def metric_chart(path: Path, metric: str, num: int, nfes: list[int] | tuple[int, ...],
                 scores: dict[str, dict[str, float]], what: str = "") -> Path:
    """``metric_vs_nfe.png``: one line per member (member → NFE as a string → value), log NFE axis."""
    from fewstep.plots import Series, line_chart

    label = metric_label(metric)
    name = label if metric in label else f"{label} ({metric})"
    series = [Series(member, list(nfes), [s.get(str(n), math.nan) for n in nfes]) for member, s in scores.items()]
    return line_chart(path, series, title=f"{name} vs NFE, {num} samples per NFE{what}",
                      xlabel="NFE (network evaluations per sample)", ylabel=f"{label} (lower is better)",
                      log_x=True, x_ticks=list(nfes))


def write_report(sweep_dir: Path, spec: SweepSpec, failed: dict[str, str] | None = None) -> list[Path]:
    """Write every report file from the unit directories; returns their paths. Without matplotlib the
    charts are left out with a warning naming the extra (the tables are still written)."""
    from fewstep.plots import Panel, PlotsUnavailable, Series, panel_chart

    rows = collect(sweep_dir, spec, failed)
    members = summarize_members(spec, rows)
    files = [sweep_dir / "results.csv", sweep_dir / "results.md"]
    write_csv(files[0], spec, rows, members)
    write_atomic(files[1], markdown(spec, rows, members))
    try:
        means = {s.member: {str(n): st.mean if (st := s.scores[spec.metric][str(n)]) else math.nan for n in spec.nfe}
                 for s in members}
        seeds = f", mean of {len(spec.seeds)} seeds" if len(spec.seeds) > 1 else ""
        files.append(metric_chart(sweep_dir / "metric_vs_nfe.png", spec.metric, spec.num, spec.nfe, means, seeds))
        first = [r for r in rows if r.seed == spec.seeds[0]]
        panels = [Panel(f"{r.member}: {r.loss_key}", r.loss_key,
                        [Series(r.member, [k for k, _ in r.losses], [v for _, v in r.losses])]) for r in first]
        files.append(panel_chart(sweep_dir / "loss_curves.png", panels, xlabel="kimg (thousands of images seen)",
                                 title="training curves (each objective's progress entry, on its own scale; "
                                       "first seed)"))
        if spec.eval_every_kimg and any(r.curve for r in rows):
            from fewstep.sweep.curves import learning_curves_png

            files.append(learning_curves_png(sweep_dir / "learning_curves.png", spec, rows, metric=spec.metric))
    except PlotsUnavailable as exc:
        log.warning(f"the report's charts are not written: {exc}")
    return files + [grid_path(sweep_dir, m) for m in spec.members if grid_path(sweep_dir, m).is_file()]
