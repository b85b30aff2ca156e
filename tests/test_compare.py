"""``fewstep compare``: config differences (experiment vs execution settings) and matched curves of two
runs, on toy2d runs trained on the CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
from imagefiles import read_rgb
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.compare import CompareError, compare_runs, read_curve
from fewstep.config import apply_overrides
from fewstep.registry import recipes
from fewstep.train import train

# toy2d: batch 256, 8 steps, a status record every step (2.048 kimg).
BASE = ["train.total_kimg=2.048", "train.status_kimg=0.256", "train.checkpoint_kimg=0", "train.sample_kimg=0",
        "sample.num_images=64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    settings = {"a": [], "same": [], "seed1": ["train.seed=1"], "micro": ["train.batch_per_gpu=128"]}
    for name, extra in settings.items():
        train(apply_overrides(recipes.get("toy2d")("fm"), BASE + extra), root / name, show_progress=False)
    return root


def test_identical_runs_match_exactly(runs):
    c = compare_runs(runs / "a", runs / "same")
    assert len(c.kimg) == 8 and c.kimg[0] == pytest.approx(0.256) and c.kimg[-1] == pytest.approx(2.048)
    assert c.config == [] and c.execution == []
    assert c.mean_abs_diff == 0 and c.relative_diff == 0 and c.max_abs_diff == 0
    logged = [json.loads(line)["loss"] for line in (runs / "a" / "log.jsonl").read_text().splitlines()
              if '"loss"' in line and '"event"' not in line]
    assert list(c.a) == pytest.approx(logged)


def test_another_seed_is_an_experiment_difference_and_the_curves_differ(runs):
    c = compare_runs(runs / "a", runs / "seed1")
    assert c.config == ["train.seed: 0 → 1"] and c.execution == []
    assert c.mean_abs_diff > 0 and c.relative_diff == pytest.approx(c.mean_abs_diff / np.mean(np.abs(c.a)))


def test_micro_batches_are_an_execution_difference(runs):
    c = compare_runs(runs / "a", runs / "micro")
    assert c.config == [] and c.execution == ["train.batch_per_gpu: None → 128"]


def test_b_is_interpolated_at_a_kimg_inside_the_overlap(runs, tmp_path):
    short = tmp_path / "short"                      # a run with records every other step, 4 steps long
    (short).mkdir()
    (short / "config.json").write_text((runs / "a" / "config.json").read_text())
    a = read_curve(runs / "a")
    records = [{"step": 2 * i, "kimg": float(k), "loss": float(v)} for i, (k, v) in
               enumerate(zip(a.kimg[1:5:2], 10 * a.values[1:5:2]))]
    (short / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{torn")
    c = compare_runs(runs / "a", short)
    assert list(c.kimg) == pytest.approx(list(a.kimg[1:4]))
    assert c.b[1] == pytest.approx(5 * (a.values[1] + a.values[3]))   # midway between the two records


def test_cli_reports_plots_and_applies_the_tolerance(runs, tmp_path):
    png = tmp_path / "curves.png"
    out = CliRunner().invoke(app, ["compare", str(runs / "a"), str(runs / "seed1"), "--plot", str(png)])
    assert out.exit_code == 0, out.output
    assert "train.seed: 0 → 1" in out.output and "loss at 8 matched points" in out.output
    assert out.output.count("ran on: 1 process · cpu · fp32 · torch") == 2   # A's and B's start records
    assert read_rgb(png).shape[2] == 3
    strict = CliRunner().invoke(app, ["compare", str(runs / "a"), str(runs / "seed1"), "--tolerance", "0"])
    assert strict.exit_code == 1 and "more than 0%" in strict.output
    same = CliRunner().invoke(app, ["compare", str(runs / "a"), str(runs / "same"), "--tolerance", "0"])
    assert same.exit_code == 0


def test_bad_input_is_named(runs, tmp_path):
    with pytest.raises(CompareError, match="no log.jsonl"):
        compare_runs(runs / "a", tmp_path)
    with pytest.raises(CompareError, match="no status record has 'nope'; logged entries: .*loss"):
        read_curve(runs / "a", "nope")
    out = CliRunner().invoke(app, ["compare", str(runs / "a"), str(tmp_path / "missing")])
    assert out.exit_code == 2 and "missing: no log.jsonl" in out.output
    (tmp_path / "log.jsonl").write_text((runs / "a" / "log.jsonl").read_text())
    with pytest.raises(CompareError, match="no config.json"):
        compare_runs(runs / "a", tmp_path)
