"""A real full disk (docs/reliability.md): a small tmpfs mounted for the test, filled with a file at a chosen
moment, so every write meets the errors the libraries really raise (safetensors' ``SafetensorError``,
``OSError(ENOSPC)`` from Python's own writes), not a mocked exception. Skipped, with the reason, where
this machine cannot mount one (it needs root)."""
from __future__ import annotations

import errno
import json
import subprocess

import pytest
from test_reliability import EVERY_2, assert_same, one_thread, snapshot, straight  # noqa: F401 (fixtures)
from test_train import tiny
from typer.testing import CliRunner

from fewstep.checkpoints import list_checkpoints
from fewstep.cli import app
from fewstep.sweep import SweepError, SweepSpec, parse_objectives, run_sweep
from fewstep.train import train

FILLER = "filler"


@pytest.fixture
def disk(tmp_path):
    """A 16 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); the full-disk "
                    f"tests need root or a user mount")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk) -> None:
    """Fill ``disk`` to the last byte with one file."""
    with open(disk / FILLER, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with pytest.raises(OSError):   # full: not even a small file's data fits
        (disk / "probe").write_bytes(b"x" * 4096)


def at_saves(monkeypatch, actions):
    """Run ``actions[step]()`` as the save of ``step`` starts, then save for real."""
    import fewstep.train.checkpointer as checkpointer

    real = checkpointer.save_checkpoint

    def save(run_dir, step, **kw):
        actions.get(step, lambda: None)()
        return real(run_dir, step, **kw)

    monkeypatch.setattr(checkpointer, "save_checkpoint", save)


def test_a_real_full_disk_during_interval_saves_keeps_training(fashion_dir, disk, monkeypatch, straight):  # noqa: F811
    run = disk / "run"
    at_saves(monkeypatch, {4: lambda: fill(disk), 8: lambda: (disk / FILLER).unlink()})   # full for saves 4 and 6
    result = train(tiny(fashion_dir, **EVERY_2, **{"train.sample_kimg": 0.032}), run, show_progress=False)
    lines = (run / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]                # every line whole: no torn record
    failed = [r for r in records if r.get("event") == "save_failed"]
    assert [r["step"] for r in failed] == [4, 6] and all("No space left on device" in r["error"] for r in failed)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-00000002", "checkpoint-00000008"]
    assert_same(snapshot(run / "checkpoint-00000002"), straight[2])   # the earlier checkpoint, intact
    assert_same(snapshot(result.checkpoint), straight[8])             # the state in memory, undisturbed
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]      # no temporary files left behind
    assert (run / "samples" / "final.png").is_file()


def test_a_disk_still_full_at_the_end_says_what_to_free_and_how_to_resume(fashion_dir, disk, monkeypatch,
                                                                         straight):  # noqa: F811
    run = disk / "run"
    sets = {"data.root": str(fashion_dir), "train.batch": 16, "train.total_kimg": 0.128, "train.status_kimg": 0.032,
            "train.checkpoint_kimg": 0.032, "train.keep_checkpoints": 0, "sample.num_images": 4, "sample.nfe": "(1,)",
            "backbone.depth": 2, "backbone.hidden_size": 32, "backbone.num_heads": 2, "train.cpu_threads": 1}
    args = ["train", "--recipe", "smoke", "--out", str(run), "--no-progress",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    at_saves(monkeypatch, {6: lambda: fill(disk)})                   # full from save 6 to the end
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    error = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in res.output
    assert "could not write checkpoint-00000008" in error[0] and "No space left on device" in error[0]
    assert "newest checkpoint (checkpoint-00000004) is intact" in error[0] and "free at least" in error[0]
    assert f"then run `fewstep train --recipe smoke --set data.root={fashion_dir} --set train.batch=16" in error[0]
    assert f"--set train.cpu_threads=1 --out {run}` to resume from it" in error[0]
    (disk / FILLER).unlink()                                           # space freed: the same command resumes
    monkeypatch.undo()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert_same(snapshot(run / "checkpoint-00000008"), straight[8])


def test_a_sweep_report_on_a_full_disk_is_one_error_and_a_rerun_writes_it(disk, monkeypatch):
    import fewstep.sweep.run as sweep_run

    spec = SweepSpec(members=parse_objectives("fm"), recipe="toy2d", nfe=(1,), num=100, grid=4, kimg=0.512,
                     overrides=("train.status_kimg=0.256", "sample.num_images=100", "train.cpu_threads=1"))
    real = sweep_run.write_report
    monkeypatch.setattr(sweep_run, "write_report", lambda *a, **k: (fill(disk), real(*a, **k))[1])
    with pytest.raises(SweepError, match=r"could not write the sweep's report .*No space left on device.*rerun the "
                                         r"same command: it only writes the report"):
        run_sweep(spec, disk / "sweep")
    assert not [p for p in (disk / "sweep").iterdir() if p.name.startswith(".")]   # no half-written report
    (disk / FILLER).unlink()
    monkeypatch.undo()
    again = run_sweep(spec, disk / "sweep")
    assert again.skipped == ["fm/seed-0"] and (disk / "sweep" / "results.md").is_file()
