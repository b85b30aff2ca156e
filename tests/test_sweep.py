"""Objective sweeps on CPU: every report file with per-seed rows, means and intervals, skipping finished
units, resuming killed ones, the wall-clock and equal-FLOP budgets, learning curves that survive a resume,
ties on synthetic results, and sweep specs (files, unknown keys, a changed spec in the same directory)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
import types

import pytest

import fewstep.train
from imagefiles import find_block, read_rgb
from logcapture import captured

from fewstep.sweep import Member, SweepError, SweepSpec, member_config, parse_objectives, run_sweep, spec_from_dict
from fewstep.sweep.report import Row, collect, markdown, progress_key, summarize_members, write_csv
from fewstep.sweep.run import prepare
from fewstep.sweep.spec import check_saved, flops_per_image, load_sweep_file, spec_to_dict
from fewstep.sweep.worker import read_curve, unit_state
from fewstep.train import train

# toy2d: batch 256, so 2.56 kimg = 10 steps; a status record every step.
TOY = dict(recipe="toy2d", nfe=(1, 2), num=200, grid=16,
           overrides=("train.status_kimg=0.256", "sample.num_images=200"))   # the loop's own toy evaluation: small


def toy_spec(objectives="fm,meanflow", **kw):
    return SweepSpec(members=parse_objectives(objectives), **{**TOY, "kimg": 2.56, **kw})


def log_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "step" in r
            and "event" not in r]


def state(out, spec, name="fm", seed=0):
    member = spec.member(name)
    return unit_state(out, spec, member, seed, member_config(spec, member, seed))


def test_two_objectives_two_seeds_write_per_seed_rows_means_intervals_and_skip_when_done(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    spec = toy_spec(seeds=(0, 1))
    result = run_sweep(spec, out)
    assert result.ran == ["fm/seed-0", "meanflow/seed-0", "fm/seed-1", "meanflow/seed-1"]
    assert not result.skipped and not result.failed
    for name in ("results.csv", "results.md", "metric_vs_nfe.png", "loss_curves.png", "samples-fm.png",
                 "samples-meanflow.png", "sweep.json"):
        assert (out / name).is_file(), name
    for unit in ("fm/seed-0", "fm/seed-1", "meanflow/seed-0", "meanflow/seed-1"):
        assert (out / unit / "eval.json").is_file(), unit
    seed_configs = [json.loads((out / f"fm/seed-{k}/config.json").read_text())["config"]["train"]["seed"] for k in (0, 1)]
    assert seed_configs == [0, 1]
    rows = list(csv.DictReader(open(out / "results.csv")))
    per_seed = [r for r in rows if r["seed"] != "mean"]
    means = [r for r in rows if r["seed"] == "mean"]
    assert len(per_seed) == 2 * 2 * 2 and len(means) == 2 * 2             # (members × seeds | members) × NFEs
    values = {}
    for r in per_seed:
        scores = json.loads((out / r["member"] / f"seed-{r['seed']}" / "eval.json").read_text())["scores"]
        assert float(r["value"]) == pytest.approx(scores["sliced-wasserstein"][r["nfe"]], rel=1e-5)
        assert r["metric"] == "sliced-wasserstein" and float(r["kimg"]) == 2.56 and r["steps"] == "10"
        assert float(r["img_per_s"]) > 0 and r["status"] == "ok" and r["peak_mem_gib"] == ""
        values.setdefault((r["member"], r["nfe"]), []).append(scores["sliced-wasserstein"][r["nfe"]])
    for r in means:
        v = values[(r["member"], r["nfe"])]
        mean, sd = sum(v) / 2, abs(v[0] - v[1]) / math.sqrt(2)
        half = 12.7062 * sd / math.sqrt(2)                                  # t(0.975, 1)·s/√n
        assert float(r["value"]) == pytest.approx(mean, rel=1e-5) and float(r["std"]) == pytest.approx(sd, rel=1e-4)
        assert float(r["ci95_low"]) == pytest.approx(mean - half, rel=1e-5)
        assert float(r["ci95_high"]) == pytest.approx(mean + half, rel=1e-5)
        assert r["n_seeds"] == "2" and r["rank"] in ("1", "1=", "2") and float(r["tflop"]) > 0
    table = (out / "results.md").read_text()
    assert "| member | SW2 @1 NFE | SW2 @2 NFE | kimg | TFLOP | img/s | CPU-min | peak GiB |" in table
    assert "Budget: equal images: 2.56 kimg per member. Training seeds: 0, 1" in table
    assert "## Per seed" in table and "| fm | 1 |" in table and "Noise floor" in table and " ± " in table
    assert "peak GPU memory allocated by training (not measured on a CPU: –)." in table
    assert read_rgb(out / "metric_vs_nfe.png").shape[2] == 3
    assert read_rgb(out / "loss_curves.png").shape[1] == 2 * 400        # one panel per member, side by side
    rows = collect(out, spec)
    fm_row, mf_row = rows[0], rows[1]                                    # MeanFlow's adaptive loss is ≈ 1:
    assert (fm_row.loss_key, mf_row.loss_key) == ("loss", "loss_u")    # its curve is the raw MSE
    records = [json.loads(line) for line in (out / "meanflow/seed-0/log.jsonl").read_text().splitlines()]
    raw = [r["loss_u"] for r in records if "loss_u" in r and "event" not in r]
    assert [v for _, v in mf_row.losses] == pytest.approx(raw) and raw != pytest.approx([r["loss"] for r in records
                                                                                         if "loss_u" in r])
    assert progress_key("scm", [{"loss": -1.0, "loss_unweighted": 0.2}]) == "loss_unweighted"
    assert progress_key("meanflow", [{"loss": 1.0}]) == "loss"           # an old log without the entry
    assert read_rgb(out / "samples-fm.png").shape[1] == 3 * 300        # points: data, 1 and 2 steps

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/checkpoint-*/*")}
    mtimes.update({p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/eval.json")})
    monkeypatch.setattr(fewstep.train, "train", lambda *a, **k: pytest.fail("a finished unit was trained"))
    monkeypatch.setattr("fewstep.sweep.worker.evaluate_unit", lambda *a, **k: pytest.fail("re-evaluated"))
    again = run_sweep(spec, out)
    assert sorted(again.skipped) == ["fm/seed-0", "fm/seed-1", "meanflow/seed-0", "meanflow/seed-1"] and not again.ran
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def synthetic_row(member, seed, value):
    return Row(member=member, objective="fm", overrides="", seed=seed, status="ok",
               scores={"sliced-wasserstein": {"1": value}}, kimg=1.0, steps=4, tflop=0.5)


def test_overlapping_intervals_are_reported_as_a_tie_on_synthetic_results(tmp_path):
    spec = SweepSpec(recipe="toy2d", members=parse_objectives("fm,meanflow,tvm"), nfe=(1,), metrics=("sliced-wasserstein",),
                     seeds=(0, 1, 2), kimg=1.0)
    values = {"fm": [1.00, 1.02, 0.98], "meanflow": [1.01, 1.04, 0.99], "tvm": [2.0, 2.02, 1.98]}
    rows = [synthetic_row(m, k, v[k]) for m, v in values.items() for k in range(3)]
    members = summarize_members(spec, rows)
    text = markdown(spec, rows, members)
    assert "SW2 @1 NFE: tie between `fm`, `meanflow` (their intervals overlap" in text
    assert "| fm | **1 ± 0.05 (1=)** |" in text and "(3)" in text          # tvm: both intervals lie below its own
    write_csv(tmp_path / "r.csv", spec, rows, members)
    ranks = {r["member"]: r["rank"] for r in csv.DictReader(open(tmp_path / "r.csv")) if r["seed"] == "mean"}
    assert ranks == {"fm": "1=", "meanflow": "1=", "tvm": "3"}
    apart = {"fm": [1.00, 1.01, 0.99], "meanflow": [1.5, 1.51, 1.49], "tvm": [2.0, 2.02, 1.98]}
    rows = [synthetic_row(m, k, v[k]) for m, v in apart.items() for k in range(3)]
    text = markdown(spec, rows, summarize_members(spec, rows))
    assert "SW2 @1 NFE: best `fm` (its interval lies below every other member's)" in text
    one = dataclasses.replace(spec, seeds=(0,))
    rows = [synthetic_row(m, 0, v[0]) for m, v in apart.items()]
    text = markdown(one, rows, summarize_members(one, rows))
    assert "not ranked (fewer than two seeds per member)" in text and "no intervals and no ranks" in text


def test_equal_flop_budgets_stop_each_member_at_its_own_image_count(tmp_path):
    spec = toy_spec("fm,ect", kimg=None, tflop=0.02)   # fm 3.6 kimg (15 steps), ECT 2.7 kimg (11)
    out = tmp_path / "sweep"
    result = run_sweep(spec, out)
    assert result.ran == ["fm/seed-0", "ect/seed-0"]
    per_image = {m: flops_per_image(member_config(spec, spec.member(m))) for m in ("fm", "ect")}
    assert per_image["ect"] == pytest.approx(4 / 3 * per_image["fm"])      # ECT: 4 F per image, FM: 3 F
    for m in ("fm", "ect"):
        cfg = member_config(spec, spec.member(m))
        assert cfg.train.total_kimg == pytest.approx(0.02 * 1e12 / per_image[m] / 1000)
        ev = json.loads((out / m / "seed-0" / "eval.json").read_text())
        target = math.ceil(cfg.train.total_kimg * 1000 / 256) * 256           # whole steps of batch 256
        assert ev["nimg"] == target and ev["tflop"] == pytest.approx(target * per_image[m] / 1e12)
        assert 0.02 <= ev["tflop"] < 0.02 + 256 * per_image[m] / 1e12         # the budget, within one step
    fm_nimg = json.loads((out / "fm/seed-0/eval.json").read_text())["nimg"]
    ect_nimg = json.loads((out / "ect/seed-0/eval.json").read_text())["nimg"]
    assert fm_nimg > ect_nimg                                             # the cheaper objective sees more images
    assert "Budget: equal compute: 0.02 TFLOP of training per member" in (out / "results.md").read_text()
    with pytest.raises(SweepError, match="one budget.*--kimg and --tflop"):
        toy_spec("fm", kimg=1.0, tflop=1.0)


def test_intermediate_evaluations_land_on_the_curves_and_survive_a_resume(tmp_path):
    out = tmp_path / "sweep"
    spec = prepare(toy_spec("fm", kimg=5.12, eval_every_kimg=1.28), out)  # points at 1.28, 2.56, 3.84, end 5.12
    cfg = member_config(spec, spec.members[0])
    cut = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_kimg=3.072))
    # A first invocation: the worker's own segments up to 2.56, then killed at 3.072 (12 steps) mid-segment.
    from fewstep.sweep.worker import evaluate_unit

    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_kimg=1.28)), out / "fm/seed-0",
          show_progress=False)
    evaluate_unit(out, spec, spec.members[0], 0, target_kimg=1.28)
    train(cut, out / "fm/seed-0", show_progress=False)
    assert [p["target_kimg"] for p in read_curve(out / "fm/seed-0")] == [1.28]
    with captured() as lines:
        result = run_sweep(spec, out)
    assert result.ran == ["fm/seed-0"] and any("resuming at 3.072 kimg" in line for line in lines), lines
    curve = read_curve(out / "fm/seed-0")
    # 2.56 was passed without a checkpoint before the sweep took over: gone; 3.84 and the end were evaluated
    assert [p["target_kimg"] for p in curve] == [1.28, 3.84, None]
    assert [p["kimg"] for p in curve] == [1.28, 3.84, 5.12]
    final = json.loads((out / "fm/seed-0/eval.json").read_text())
    assert curve[-1]["scores"] == final["scores"] and curve[-1]["step"] == final["checkpoint_step"] == 20
    assert all(p["tflop"] > 0 and p["train_seconds"] > 0 for p in curve)
    assert curve[0]["scores"]["sliced-wasserstein"]["1"] != final["scores"]["sliced-wasserstein"]["1"]
    steps = log_steps(out / "fm/seed-0")
    assert steps == list(range(1, 21))                                    # segments resumed, nothing redone
    assert (out / "learning_curves.png").is_file() and "learning_curves.png" in (out / "results.md").read_text()
    longer = run_sweep(toy_spec("fm", kimg=7.68, eval_every_kimg=1.28), out)
    assert longer.ran == ["fm/seed-0"]                                   # lengthened: the curve continues
    # the old end (5.12 kimg) is also the point 4 × 1.28: relabelled, not evaluated again
    assert [p["target_kimg"] for p in read_curve(out / "fm/seed-0")] == [1.28, 3.84, 5.12, 6.4, None]
    assert [p["kimg"] for p in read_curve(out / "fm/seed-0")] == [1.28, 3.84, 5.12, 6.4, 7.68]


def test_an_interrupted_member_resumes_where_it_stopped(tmp_path):
    out, spec = tmp_path / "sweep", toy_spec("fm")
    spec = prepare(spec, out)
    first = member_config(spec, spec.members[0])
    first.train.total_kimg = 1.024                      # an earlier invocation stopped after 4 of 10 steps
    train(first, out / "fm/seed-0", show_progress=False)
    assert not state(out, spec).trained
    with captured() as messages:
        result = run_sweep(spec, out)
    assert result.ran == ["fm/seed-0"] and "fm/seed-0: resuming at 1.024 kimg (step 4)" in messages
    assert log_steps(out / "fm/seed-0") == list(range(1, 11))  # steps 5–10 continued the run; none was redone


def test_a_member_killed_by_sigterm_resumes_in_a_parallel_sweep(tmp_path):
    # A 3-second budget per member; the worker subprocess gets SIGTERM after its first status line.
    out = tmp_path / "sweep"
    spec = prepare(toy_spec("fm,ect", kimg=None, minutes=0.05), out)
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.sweep", str(out), "fm", "--seed", "0"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err.txt", "w"))
    log = out / "fm/seed-0/log.jsonl"
    deadline = time.time() + 60
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, (tmp_path / "err.txt").read_text()[-3000:]
    stopped_at = log_steps(out / "fm/seed-0")[-1]
    assert not state(out, spec).trained
    result = run_sweep(spec, out, parallel=2)     # subprocesses, side by side
    assert sorted(result.ran) == ["ect/seed-0", "fm/seed-0"] and not result.failed
    steps = log_steps(out / "fm/seed-0")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at
    assert "resuming at" in (out / "fm/seed-0/worker.log").read_text()
    manifest = json.loads(sorted((out / "fm/seed-0").glob("checkpoint-*"))[-1].joinpath("manifest.json").read_text())
    assert manifest["train_seconds"] >= 3.0 and manifest["nimg"] < 256 * 1000 * 1000


def test_the_budget_stops_training_and_is_summed_over_resumes(tmp_path, monkeypatch):
    # A fake clock that advances 1 s per reading makes the budget count readings, deterministically.
    clock = iter(range(10**6))
    monkeypatch.setattr("fewstep.train.clock.time", types.SimpleNamespace(time=lambda: float(next(clock))))
    spec = toy_spec("fm", kimg=None, minutes=1.0)        # 60 fake seconds
    cfg = member_config(spec, spec.members[0])
    whole = train(cfg, tmp_path / "whole", show_progress=False)
    assert whole.budget_reached and 0 < whole.step < 1000
    manifest = json.loads((whole.checkpoint / "manifest.json").read_text())
    assert manifest["train_seconds"] >= 60
    events = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "budget_reached" for e in events)

    part = member_config(spec, spec.members[0])
    part.train.total_kimg = 256 * 5 / 1000                  # first invocation: 5 steps, by length
    assert not train(part, tmp_path / "split", show_progress=False).budget_reached
    resumed = train(cfg, tmp_path / "split", show_progress=False)
    assert resumed.budget_reached and abs(resumed.step - whole.step) <= 2   # the first 5 steps' time counted
    again = train(cfg, tmp_path / "split", show_progress=False)             # spent: no further step
    assert again.budget_reached and again.step == resumed.step


def test_sweep_files_and_spec_checks(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('recipe = "toy2d"\nkimg = 2.56\nnfe = [1, 4]\noverrides = ["train.lr=2e-3"]\n'
                    '[[members]]\nobjective = "fm"\n[[members]]\nobjective = "fm"\nname = "fm-lr1e-3"\n'
                    'overrides = ["train.lr=1e-3"]\n')
    spec = spec_from_dict(load_sweep_file(toml))
    assert [m.name for m in spec.members] == ["fm", "fm-lr1e-3"] and spec.nfe == (1, 4)
    assert [member_config(spec, m).train.lr for m in spec.members] == [2e-3, 1e-3]
    (tmp_path / "s.json").write_text(json.dumps(spec_to_dict(spec)))
    assert spec_from_dict(load_sweep_file(tmp_path / "s.json")) == spec
    with pytest.raises(SweepError, match="unknown key 'nfes'.*did you mean 'nfe'"):
        spec_from_dict({"recipe": "toy2d", "members": ["fm"], "nfes": [1]})
    with pytest.raises(SweepError, match="member names must be unique; fm appear"):
        spec_from_dict({"recipe": "toy2d", "members": ["fm", "fm"]})
    with pytest.raises(SweepError, match="member 'fm'.*unknown key 'lrr'"):
        member_config(toy_spec("fm", overrides=("train.lrr=1",)), parse_objectives("fm")[0])
    with pytest.raises(SweepError, match="needs images"):
        prepare(toy_spec("fm", metrics=("fmnist-classifier",)), tmp_path / "x")
    check_saved(tmp_path / "d", toy_spec())
    check_saved(tmp_path / "d", toy_spec())               # the same spec: fine
    with pytest.raises(SweepError, match=r"another spec \(nfe: \[1, 2\] → \[1\]; num: 200 → 300\)"):
        check_saved(tmp_path / "d", toy_spec(nfe=(1,), num=300))
    assert check_saved(tmp_path / "d", toy_spec(seeds=(0, 1))) == ["seeds: [0] → [0, 1]"]   # more seeds: fine
    with pytest.raises(SweepError, match=r"kimg: 2.56 → None; minutes: None → 1.0"):           # another budget kind
        check_saved(tmp_path / "d", toy_spec(seeds=(0, 1), kimg=None, minutes=1.0))
    old = spec_from_dict({"recipe": "toy2d", "members": ["fm"], "metric": "a,b", "seed": 3})   # older files
    assert old.metrics == ("a", "b") and old.seeds == (3,)
    with pytest.raises(SweepError, match="seeds must be distinct"):
        toy_spec(seeds=(1, 1))


def test_the_cli_runs_an_image_sweep_with_the_classifier_metric(fashion_dir, tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    out = tmp_path / "img"
    args = ["sweep", "--objectives", "fm,tvm", "--recipe", "smoke", "--kimg", "0.032", "--batch", "16", "--nfe", "1,2",
            "--num", "32", "--grid", "4", "--metric", "fmnist-classifier", "--out", str(out),
            *[a for s in ("backbone.depth=1", "backbone.num_heads=2", "backbone.hidden_size=32",
                          f"data.root={fashion_dir}", "train.status_kimg=0.016") for a in ("--set", s)]]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| fm |" in res.output and "FD-fmnist-classifier @2 NFE" in res.output
    assert (out / "reference-fmnist-classifier.npz").is_file()
    from fewstep.build import load_objective
    from fewstep.images import make_grid, to_uint8
    from fewstep.sample import sample

    tvm, _, _ = load_objective(out / "tvm" / "seed-0")
    blocks = make_grid([to_uint8(sample(tvm, range(4), n, weights="ema").images) for n in (1, 2)])
    assert blocks.shape == (1, 2 * (2 * 34 + 2) + 4, 2 * 34 + 2)   # two blocks (NFE 1, 2) of 2×2 images
    assert len(find_block(read_rgb(out / "samples-tvm.png"), blocks.expand(3, -1, -1).permute(1, 2, 0).numpy())) == 1
    body = json.loads((out / "tvm/seed-0/fid.json").read_text())
    assert body["extractor"]["extractor"] == "fmnist-classifier" and set(body["fid"]) == {"1", "2"}
    args[args.index("--num") + 1] = "64"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "num: 32 → 64" in " ".join(res.output.split())


def test_a_larger_budget_trains_finished_members_on_and_evaluates_them_again(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(toy_spec("fm"), out)
    first = json.loads((out / "fm/seed-0/eval.json").read_text())
    assert first["checkpoint_step"] == 10
    with captured() as lines:
        again = run_sweep(toy_spec("fm", kimg=5.12), out)
    assert again.ran == ["fm/seed-0"] and not again.skipped
    assert any(line.startswith("spec changed (kimg: 2.56 → 5.12)") for line in lines), lines
    steps = log_steps(out / "fm/seed-0")
    assert steps[-1] == 20 and steps.count(1) == 1 and steps.count(11) == 1         # resumed, not restarted
    assert json.loads((out / "fm/seed-0/eval.json").read_text())["checkpoint_step"] == 20
    row = next(r for r in csv.DictReader(open(out / "results.csv")) if r["seed"] == "0")
    assert row["steps"] == "20" and float(row["kimg"]) == 5.12
    assert json.loads((out / "sweep.json").read_text())["kimg"] == 5.12
    with pytest.raises(SweepError, match=r"another spec \(num: 200 → 300\).*only the budget's value"):
        run_sweep(toy_spec("fm", kimg=7.68, num=300), out)


def test_missing_matplotlib_is_one_clear_error_before_any_compute(tmp_path, monkeypatch):
    from fewstep.plots import PlotsUnavailable

    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import matplotlib → ImportError
    with pytest.raises(PlotsUnavailable, match=r"pip install 'fewstep\[plots\]'"):
        run_sweep(toy_spec("fm", eval_every_kimg=1.28), tmp_path / "s")
    assert not (tmp_path / "s" / "fm").exists()


def test_a_member_initialised_from_another_trains_after_it_and_from_its_weights(tmp_path):
    spec = toy_spec("fm,dmf@fm", kimg=0.512)
    assert spec.members[1] == Member(objective="dmf", name="dmf", init_from="fm")
    assert member_config(spec, spec.members[1], 0, tmp_path).train.init_from == str(tmp_path.resolve() / "fm" / "seed-0")
    result = run_sweep(spec, tmp_path)
    assert result.ran == ["fm/seed-0", "dmf/seed-0"] and not result.failed
    events = [r for r in map(json.loads, (tmp_path / "dmf" / "seed-0" / "log.jsonl").read_text().splitlines())
              if r.get("event") == "init_from"]
    assert len(events) == 1 and str(tmp_path.resolve() / "fm" / "seed-0" / "checkpoint-") in events[0]["source"]
    assert "| dmf (from fm) |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SweepError, match="member 'dmf' initialises from 'fm', which must be an earlier member"):
        toy_spec("dmf@fm,fm")
    with pytest.raises(SweepError, match="initialises from 'tvm'"):
        spec_from_dict({"recipe": "toy2d", "members": ["fm", {"objective": "dmf", "init_from": "tvm"}]})


def test_a_member_whose_source_failed_is_not_started(tmp_path, monkeypatch):
    import fewstep.sweep.run as run_mod

    real = run_mod.run_unit

    def failing(sweep_dir, spec, name, seed, **kw):
        if name == "fm":
            raise RuntimeError("diverged")
        return real(sweep_dir, spec, name, seed, **kw)

    monkeypatch.setattr(run_mod, "run_unit", failing)
    result = run_sweep(toy_spec("fm,dmf@fm,meanflow", kimg=0.256), tmp_path)
    assert result.failed["fm/seed-0"] == "RuntimeError: diverged"
    assert result.failed["dmf/seed-0"] == "not started: the member it initialises from, 'fm', failed"
    assert result.ran == ["meanflow/seed-0"]


def test_sweep_dry_run_checks_every_member_including_those_initialised_from_another(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    res = CliRunner().invoke(app, ["sweep", "--objectives", "fm,dmf@fm", "--recipe", "toy2d", "--seeds", "0,1",
                                   "--out", str(tmp_path / "s"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert f"train.init_from: None → '{(tmp_path / 's').resolve() / 'fm' / 'seed-0'}'" in " ".join(res.output.split())


def test_a_single_member_is_named_the_only_member_not_the_best():
    spec = SweepSpec(recipe="toy2d", members=parse_objectives("fm"), nfe=(1,), metrics=("sliced-wasserstein",),
                     seeds=(0, 1, 2), kimg=1.0)
    rows = [synthetic_row("fm", k, v) for k, v in enumerate([1.0, 1.01, 0.99])]
    text = markdown(spec, rows, summarize_members(spec, rows))
    assert "SW2 @1 NFE: `fm` is the only member" in text and "best `fm`" not in text
