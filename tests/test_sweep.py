"""Objective sweeps on CPU: every report file, skipping finished members, resuming killed ones, the
wall-clock budget, and sweep specs (files, unknown keys, a changed spec in the same directory)."""
from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time
import types

import pytest
from imagefiles import find_block, read_rgb
from logcapture import captured

import fewstep.train
from fewstep.sweep import Member, SweepError, SweepSpec, member_config, parse_objectives, run_sweep, spec_from_dict
from fewstep.sweep.report import collect, progress_key
from fewstep.sweep.run import prepare
from fewstep.sweep.spec import check_saved, load_sweep_file, spec_to_dict
from fewstep.sweep.worker import member_state
from fewstep.train import train

# toy2d: batch 256, so 2.56 kimg = 10 steps; a status record every step.
TOY = dict(recipe="toy2d", nfe=(1, 2), num=200, grid=16,
           overrides=("train.status_kimg=0.256", "sample.num_images=200"))   # the loop's own toy evaluation: small


def toy_spec(objectives="fm,meanflow", **kw):
    return SweepSpec(members=parse_objectives(objectives), **{**TOY, "kimg": 2.56, **kw})


def log_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "step" in r
            and "event" not in r]


def test_a_sweep_writes_every_file_and_a_rerun_skips_finished_members(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    result = run_sweep(toy_spec(), out)
    assert result.ran == ["fm", "meanflow"] and not result.skipped and not result.failed
    for name in ("results.csv", "results.md", "metric_vs_nfe.png", "loss_curves.png", "samples-fm.png",
                 "samples-meanflow.png", "sweep.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["member"] for r in rows] == ["fm", "meanflow"]
    for row in rows:
        scores = json.loads((out / row["member"] / "eval.json").read_text())["scores"]
        assert float(row["nfe_1"]) == pytest.approx(scores["1"], rel=1e-5) and math.isfinite(float(row["nfe_2"]))
        assert row["metric"] == "sliced-wasserstein" and float(row["kimg"]) == 2.56 and row["steps"] == "10"
        assert float(row["img_per_s"]) > 0 and row["status"] == "ok" and row["peak_mem_gib"] == ""
    table = (out / "results.md").read_text()
    assert "| member | SW2 @1 NFE | SW2 @2 NFE | kimg | img/s | CPU-min | peak GiB |" in table
    assert "| fm |" in table and "| meanflow |" in table and "Noise floor" in table
    assert read_rgb(out / "metric_vs_nfe.png").shape[2] == 3
    assert read_rgb(out / "loss_curves.png").shape[1] == 2 * 400        # one panel per member, side by side
    fm_row, mf_row = collect(out, toy_spec())                           # MeanFlow's adaptive loss is ≈ 1:
    assert (fm_row.loss_key, mf_row.loss_key) == ("loss", "loss_u")    # its curve is the raw MSE
    records = [json.loads(line) for line in (out / "meanflow" / "log.jsonl").read_text().splitlines()]
    raw = [r["loss_u"] for r in records if "loss_u" in r and "event" not in r]
    assert [v for _, v in mf_row.losses] == pytest.approx(raw) and raw != pytest.approx([r["loss"] for r in records
                                                                                         if "loss_u" in r])
    assert progress_key("scm", [{"loss": -1.0, "loss_unweighted": 0.2}]) == "loss_unweighted"
    assert progress_key("meanflow", [{"loss": 1.0}]) == "loss"           # an old log without the entry
    assert read_rgb(out / "samples-fm.png").shape[1] == 3 * 300        # points: data, 1 and 2 steps

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint-*/*")}
    mtimes.update({p: p.stat().st_mtime_ns for p in out.glob("*/eval.json")})
    monkeypatch.setattr(fewstep.train, "train", lambda *a, **k: pytest.fail("a finished member was trained"))
    monkeypatch.setattr("fewstep.sweep.worker.evaluate_member", lambda *a, **k: pytest.fail("re-evaluated"))
    again = run_sweep(toy_spec(), out)
    assert again.skipped == ["fm", "meanflow"] and not again.ran
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_an_interrupted_member_resumes_where_it_stopped(tmp_path):
    out, spec = tmp_path / "sweep", toy_spec("fm")
    spec = prepare(spec, out)
    first = member_config(spec, spec.members[0])
    first.train.total_kimg = 1.024                      # an earlier invocation stopped after 4 of 10 steps
    train(first, out / "fm", show_progress=False)
    assert not member_state(out, spec, spec.members[0], member_config(spec, spec.members[0])).trained
    with captured() as messages:
        result = run_sweep(spec, out)
    assert result.ran == ["fm"] and "fm: resuming at 1.024 kimg (step 4)" in messages
    assert log_steps(out / "fm") == list(range(1, 11))  # steps 5–10 continued the run; none was redone


def test_a_member_killed_by_sigterm_resumes_in_a_parallel_sweep(tmp_path):
    # A 3-second budget per member; the worker subprocess gets SIGTERM after its first status line.
    out = tmp_path / "sweep"
    spec = prepare(toy_spec("fm,ect", kimg=None, minutes=0.05), out)
    proc = subprocess.Popen([sys.executable, "-m", "fewstep.sweep", str(out), "fm"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err.txt", "w"))
    log = out / "fm" / "log.jsonl"
    deadline = time.time() + 60
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM, (tmp_path / "err.txt").read_text()[-3000:]
    stopped_at = log_steps(out / "fm")[-1]
    assert not member_state(out, spec, spec.members[0], member_config(spec, spec.members[0])).trained
    result = run_sweep(spec, out, parallel=2)     # subprocesses, side by side
    assert sorted(result.ran) == ["ect", "fm"] and not result.failed
    steps = log_steps(out / "fm")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > stopped_at
    assert "resuming at" in (out / "fm" / "worker.log").read_text()
    manifest = json.loads(sorted((out / "fm").glob("checkpoint-*"))[-1].joinpath("manifest.json").read_text())
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
        prepare(toy_spec("fm", metric="fmnist-classifier"), tmp_path / "x")
    check_saved(tmp_path / "d", toy_spec())
    check_saved(tmp_path / "d", toy_spec())               # the same spec: fine
    with pytest.raises(SweepError, match=r"another spec \(nfe: \[1, 2\] → \[1\]; num: 200 → 300\)"):
        check_saved(tmp_path / "d", toy_spec(nfe=(1,), num=300))


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

    tvm, _, _ = load_objective(out / "tvm")
    blocks = make_grid([to_uint8(sample(tvm, range(4), n, weights="ema").images) for n in (1, 2)])
    assert blocks.shape == (1, 2 * (2 * 34 + 2) + 4, 2 * 34 + 2)   # two blocks (NFE 1, 2) of 2×2 images
    assert len(find_block(read_rgb(out / "samples-tvm.png"), blocks.expand(3, -1, -1).permute(1, 2, 0).numpy())) == 1
    body = json.loads((out / "tvm" / "fid.json").read_text())
    assert body["extractor"]["extractor"] == "fmnist-classifier" and set(body["fid"]) == {"1", "2"}
    args[args.index("--num") + 1] = "64"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "num: 32 → 64" in " ".join(res.output.split())


def test_a_larger_budget_trains_finished_members_on_and_evaluates_them_again(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(toy_spec("fm"), out)
    first = json.loads((out / "fm" / "eval.json").read_text())
    assert first["checkpoint_step"] == 10
    with captured() as lines:
        again = run_sweep(toy_spec("fm", kimg=5.12), out)
    assert again.ran == ["fm"] and not again.skipped
    assert any(line.startswith("budget changed (kimg: 2.56 → 5.12)") for line in lines), lines
    steps = log_steps(out / "fm")
    assert steps[-1] == 20 and steps.count(1) == 1 and steps.count(11) == 1         # resumed, not restarted
    assert json.loads((out / "fm" / "eval.json").read_text())["checkpoint_step"] == 20
    row = next(csv.DictReader(open(out / "results.csv")))
    assert row["steps"] == "20" and float(row["kimg"]) == 5.12
    assert json.loads((out / "sweep.json").read_text())["kimg"] == 5.12
    with pytest.raises(SweepError, match=r"another spec \(num: 200 → 300\).*only kimg and minutes"):
        run_sweep(toy_spec("fm", kimg=7.68, num=300), out)


def test_a_member_initialised_from_another_trains_after_it_and_from_its_weights(tmp_path):
    spec = toy_spec("fm,dmf@fm", kimg=0.512)
    assert spec.members[1] == Member(objective="dmf", name="dmf", init_from="fm")
    assert member_config(spec, spec.members[1], tmp_path).train.init_from == str(tmp_path.resolve() / "fm")
    result = run_sweep(spec, tmp_path)
    assert result.ran == ["fm", "dmf"] and not result.failed
    events = [r for r in map(json.loads, (tmp_path / "dmf" / "log.jsonl").read_text().splitlines())
              if r.get("event") == "init_from"]
    assert len(events) == 1 and str(tmp_path.resolve() / "fm" / "checkpoint-") in events[0]["source"]
    assert "| dmf (from fm) |" in (tmp_path / "results.md").read_text()
    with pytest.raises(SweepError, match="member 'dmf' initialises from 'fm', which must be an earlier member"):
        toy_spec("dmf@fm,fm")
    with pytest.raises(SweepError, match="initialises from 'tvm'"):
        spec_from_dict({"recipe": "toy2d", "members": ["fm", {"objective": "dmf", "init_from": "tvm"}]})


def test_a_member_whose_source_failed_is_not_started(tmp_path, monkeypatch):
    import fewstep.sweep.run as run_mod

    real = run_mod.run_member

    def failing(sweep_dir, spec, name, **kw):
        if name == "fm":
            raise RuntimeError("diverged")
        return real(sweep_dir, spec, name, **kw)

    monkeypatch.setattr(run_mod, "run_member", failing)
    result = run_sweep(toy_spec("fm,dmf@fm,meanflow", kimg=0.256), tmp_path)
    assert result.failed["fm"] == "RuntimeError: diverged"
    assert result.failed["dmf"] == "not started: the member it initialises from, 'fm', failed"
    assert result.ran == ["meanflow"]
