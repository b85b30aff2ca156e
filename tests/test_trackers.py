"""train.trackers: TensorBoard event files hold the logged scalars and the sample grids (read back with
TensorBoard's own reader); wandb in offline mode; bad names and missing packages fail before compute."""
from __future__ import annotations

import json
import time

import pytest

from fewstep.config import ConfigError, TrainConfig

TINY = ["backbone.depth=1", "backbone.hidden_size=32", "backbone.num_heads=2", "sample.num_images=4",
        "sample.nfe=(1,)", "train.status_kimg=0.016", "train.sample_kimg=0.032"]


def _train(fashion_dir, out, trackers):
    from fewstep.build import build_config
    from fewstep.train import train

    cfg = build_config("smoke", "fm", None, None, 0.064, 16,
                       [f"data.root={fashion_dir}", *TINY, f"train.trackers={trackers!r}"])
    return train(cfg, out, show_progress=False)


def _status(run_dir):
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r]


def test_tensorboard_events_hold_the_logged_scalars_and_grids(fashion_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'fewstep[trackers]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _train(fashion_dir, out, ("tensorboard",))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    status = _status(out)
    assert len(status) == 4
    for key in ("loss", "loss_fm", "grad_norm", "img_per_s", "kimg"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in status], key
    assert "time" not in events.Tags()["scalars"] and "step" not in events.Tags()["scalars"]
    assert set(events.Tags()["images"]) == {"samples/kimg000000.0", "samples/final"}
    final = events.Images("samples/final")[-1]
    assert final.step == 4 and (final.width, final.height) == (2 * 34 + 2, 2 * 34 + 2)   # a 2×2 grid of 32 px
    assert list(out.glob("tensorboard/*/hparams.yml"))                                   # the resolved config
    hparams = next(out.glob("tensorboard/*/hparams.yml")).read_text()
    assert "train.lr: 0.001" in hparams and "objective.name: fm" in hparams


def test_wandb_offline_run_holds_the_curves_and_grids(fashion_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'fewstep[trackers]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _train(fashion_dir, out, ("wandb",))
    (run,) = out.glob("wandb/offline-run-*")
    keys = (b"loss_fm", b"grad_norm", b"img_per_s", b"train.lr")
    deadline = time.monotonic() + 60    # wandb's service process may still be writing on a loaded machine
    while True:
        data = next(run.glob("*.wandb")).read_bytes()   # protobuf records: the logged keys are in it verbatim
        if all(key in data for key in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key
    grids = sorted(p.name for p in run.glob("files/media/images/samples/*.png"))
    assert [g.split("_")[0] for g in grids] == ["final", "kimg000000.0"]


def test_unknown_and_missing_trackers_fail_before_training(fashion_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*did you mean 'tensorboard'"):
        TrainConfig(trackers=("tensorbord",))
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'fewstep\[trackers\]'"):
        _train(fashion_dir, tmp_path / "run", ("tensorboard",))
    assert not list((tmp_path / "run").glob("checkpoint-*"))
