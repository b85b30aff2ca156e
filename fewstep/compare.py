"""``fewstep compare``: do two runs train the same way? Their config differences and logged curves.

The use it was written for: a run on N GPUs against the same experiment on one GPU (same global batch),
whose loss curves should agree up to the noise of different random draws. Also any A/B of two runs.

Curves are the status records of each run's ``log.jsonl`` (one per ``train.status_kimg``), matched by
kimg: run B is linearly interpolated at run A's kimg values inside the range both cover.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fewstep.build import config_changes, with_defaults
from fewstep.train.status import describe, start_records, status_records

# Settings that change how a run executes, not what it computes (up to floating-point order).
EXECUTION_KEYS = frozenset({"train.distributed", "train.batch_per_gpu", "train.compile", "train.compile_tuning",
                            "train.activation_checkpointing", "train.checkpoint_blocks", "train.max_minutes",
                            "train.status_kimg", "train.checkpoint_kimg", "train.sample_kimg",
                            "train.keep_checkpoints", "train.trackers", "train.tracker_project"})


class CompareError(ValueError):
    """A run directory without what a comparison needs (config, log, the curve's key)."""


@dataclass
class Curve:
    """One logged entry over training: kimg (increasing) and values, from a run's status records."""

    run: str
    key: str
    kimg: np.ndarray
    values: np.ndarray


@dataclass
class Comparison:
    """Two runs' curves of one key on run A's kimg grid, and their config differences.

    Attributes:
        kimg: (P,) the matched kimg values (those of A inside B's range).
        a, b: (P,) A's values and B's interpolated values there.
        config: ``key: A → B`` for each differing setting that changes the experiment.
        execution: the same for settings that change only how it runs (``EXECUTION_KEYS``).
        starts_a, starts_b: each run's ``start`` records (processes, device, backend, precision; one
            per launch), empty for runs logged before fewstep wrote them.
    """

    key: str
    kimg: np.ndarray
    a: np.ndarray
    b: np.ndarray
    config: list[str] = field(default_factory=list)
    execution: list[str] = field(default_factory=list)
    starts_a: list[dict] = field(default_factory=list)
    starts_b: list[dict] = field(default_factory=list)

    @property
    def mean_abs_diff(self) -> float:
        return float(np.mean(np.abs(self.a - self.b)))

    @property
    def relative_diff(self) -> float:
        """Mean |A − B| over the mean |A|: 0 for identical curves."""
        scale = float(np.mean(np.abs(self.a)))
        if scale > 0:
            return self.mean_abs_diff / scale
        return math.inf if self.mean_abs_diff > 0 else 0.0

    @property
    def max_abs_diff(self) -> float:
        return float(np.max(np.abs(self.a - self.b)))


def read_curve(run_dir: str | Path, key: str = "loss") -> Curve:
    """The ``key`` entry of every status record in ``run_dir/log.jsonl`` (a torn last line is ignored)."""
    if not (Path(run_dir) / "log.jsonl").is_file():
        raise CompareError(f"{run_dir}: no log.jsonl (is it a fewstep run directory?)")
    status = status_records(run_dir)
    points = sorted((float(r["kimg"]), float(r[key])) for r in status if key in r)
    if not points:
        known = sorted({k for r in status for k in r} - {"step", "kimg", "time"})
        raise CompareError(f"{run_dir}: no status record has {key!r}; logged entries: {', '.join(known) or 'none'}")
    kimg, values = (np.array(v, dtype=np.float64) for v in zip(*points))
    return Curve(run=str(run_dir), key=key, kimg=kimg, values=values)


def _config(run_dir: str | Path) -> dict:
    """The run's resolved config with its data spec under ``data_spec`` (from ``config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CompareError(f"{run_dir}: no config.json (is it a fewstep run directory?)")
    saved = json.loads(path.read_text())
    return {**with_defaults(saved.get("config", {})), "data_spec": saved.get("data_spec", {})}


def compare_runs(run_a: str | Path, run_b: str | Path, key: str = "loss") -> Comparison:
    """Compare run B with run A: config differences, and B's ``key`` curve interpolated at A's kimg."""
    a, b = read_curve(run_a, key), read_curve(run_b, key)
    changes = config_changes(_config(run_a), _config(run_b))
    execution = [c for c in changes if c.split(":")[0] in EXECUTION_KEYS]
    inside = (a.kimg >= b.kimg[0] - 1e-9) & (a.kimg <= b.kimg[-1] + 1e-9)
    if not inside.any():
        raise CompareError(f"the runs' {key} curves do not overlap: {run_a} covers {a.kimg[0]:g}–{a.kimg[-1]:g} "
                           f"kimg, {run_b} {b.kimg[0]:g}–{b.kimg[-1]:g} kimg")
    kimg = a.kimg[inside]
    return Comparison(key=key, kimg=kimg, a=a.values[inside], b=np.interp(kimg, b.kimg, b.values),
                      config=[c for c in changes if c not in execution], execution=execution,
                      starts_a=start_records(run_a), starts_b=start_records(run_b))


def report(c: Comparison, name_a: str, name_b: str) -> list[str]:
    """Human-readable lines: differences, then the curve statistics."""
    lines = [f"A = {name_a}", f"B = {name_b}"]
    for name, starts in (("A", c.starts_a), ("B", c.starts_b)):
        if starts:
            launches = f" ({len(starts)} launches; the last)" if len(starts) > 1 else ""
            lines.append(f"{name} ran on{launches}: {describe(starts[-1])}")
    lines += ["settings that change the experiment: " + ("none" if not c.config else "")]
    lines += [f"  {x}" for x in c.config]
    if c.execution:
        lines += ["settings that change only how it runs:"] + [f"  {x}" for x in c.execution]
    lines.append(f"{c.key} at {len(c.kimg)} matched points ({c.kimg[0]:g}–{c.kimg[-1]:g} kimg): "
                 f"mean |A − B| {c.mean_abs_diff:.4g} ({100 * c.relative_diff:.2f}% of mean |A|), "
                 f"max |A − B| {c.max_abs_diff:.4g}; last A {c.a[-1]:.4g}, B {c.b[-1]:.4g}")
    return lines


def plot(c: Comparison, path: str | Path, name_a: str = "A", name_b: str = "B") -> Path:
    """Both curves on one chart, as a PNG (needs matplotlib: ``fewstep[plots]``)."""
    from fewstep.plots import Series, line_chart

    return line_chart(path, [Series(name_a, list(c.kimg), list(c.a)), Series(name_b, list(c.kimg), list(c.b))],
                      title=f"{c.key}: {name_a} vs {name_b}", xlabel="kimg (thousands of images seen)", ylabel=c.key)
