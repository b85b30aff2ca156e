"""Learning curves of a sweep (``learning_curves.png``), drawn with matplotlib.

Each unit's ``curve.jsonl`` holds the evaluations made during training (every ``eval_every_kimg``) and at
the end. For every member the points of its seeds are matched by evaluation point (the same target kimg;
the final evaluations together) and drawn as the mean over seeds with a band for the 95 % t-interval of
the mean (:func:`fewstep.sweep.stats.summarize`), against three x-axes — images seen (kimg), training
minutes and training TFLOP (each the mean over the seeds at that point) — one column per NFE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fewstep.plots import DPI, PlotsUnavailable, figure, save_figure
from fewstep.sweep.stats import summarize

AXES = (("kimg", "images seen (kimg)"), ("minutes", "training minutes"), ("tflop", "training TFLOP"))


def curve_points(rows: Sequence[Any], metric: str, nfe: str) -> list[dict]:
    """The matched points of one member's units (``rows``: its report rows, each with ``curve``): per point
    the mean x of every axis and the :class:`~fewstep.sweep.stats.Summary` of the metric, ordered by kimg."""
    groups: dict[Any, list[dict]] = {}
    for row in rows:
        for p in row.curve:
            key = round(p["target_kimg"], 6) if p.get("target_kimg") is not None else "end"
            groups.setdefault(key, []).append(p)
    out = []
    for key, pts in groups.items():
        values = [p["scores"].get(metric, {}).get(nfe) for p in pts]
        summary = summarize(values)
        if summary is None:
            continue
        xs = {"kimg": [p["kimg"] for p in pts],
              "minutes": [p["train_seconds"] / 60 for p in pts if p.get("train_seconds") is not None],
              "tflop": [p["tflop"] for p in pts if p.get("tflop") is not None]}
        out.append({"key": key, "summary": summary,
                    **{axis: sum(v) / len(v) if v else None for axis, v in xs.items()}})
    return sorted(out, key=lambda p: p["kimg"])


def learning_curves_png(path: Path, spec: Any, rows: Sequence[Any], metric: str) -> Path:
    """Draw ``metric`` against images, minutes and TFLOP (rows) for every NFE (columns), one line per member
    with its seeds' 95 % band; returns ``path``."""
    from fewstep.sweep.report import metric_label

    nfes = [str(n) for n in spec.nfe]
    fig = figure(4.2 * len(nfes) * DPI, 3.2 * len(AXES) * DPI)
    axes = fig.subplots(len(AXES), len(nfes), squeeze=False)
    label = metric_label(metric)
    for col, nfe in enumerate(nfes):
        for row_i, (axis, axis_label) in enumerate(AXES):
            ax = axes[row_i][col]
            spread = []
            for i, member in enumerate(m.name for m in spec.members):
                pts = [p for p in curve_points([r for r in rows if r.member == member], metric, nfe)
                       if p[axis] is not None]
                if not pts:
                    continue
                x = [p[axis] for p in pts]
                y = [p["summary"].mean for p in pts]
                color = f"C{i % 10}"
                ax.plot(x, y, "o-", color=color, label=member, markersize=3, linewidth=1.5)
                low = [p["summary"].low if p["summary"].low is not None else p["summary"].mean for p in pts]
                high = [p["summary"].high if p["summary"].high is not None else p["summary"].mean for p in pts]
                ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
                spread += [v for v in low + high if v > 0]
            if spread and max(spread) / min(spread) > 20:
                ax.set_yscale("log")
            ax.set_xlabel(axis_label)
            ax.set_ylabel(label)
            ax.set_title(f"{label} @{nfe} NFE", fontsize=10)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.972), ncol=min(len(labels), 6),
                   frameon=False)
    seeds = len(spec.seeds)
    fig.suptitle(f"{label} during training: mean of {seeds} seed{'s' if seeds > 1 else ''}"
                 + (", band: 95 % interval" if seeds > 1 else ""), y=0.995, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save_figure(fig, path)


__all__ = ["PlotsUnavailable", "curve_points", "learning_curves_png"]
