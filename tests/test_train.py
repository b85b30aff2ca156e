"""Training loop on CPU: loss goes down, config saved first, exact resume, bad input refused.

Faults (non-finite steps, kills, signals, failed saves) are in test_reliability.py and test_faults.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fewstep.config import ConfigError, apply_overrides, run_config_from_dict
from fewstep.objectives.fm import FlowMatching
from fewstep.registry import recipes
from fewstep.train import plan_batches, train


def tiny(fashion_dir, **overrides):
    cfg = recipes.get("smoke")()
    sets = {"data.root": str(fashion_dir), "train.batch": 16, "train.total_kimg": 0.128,
            "train.status_kimg": 0.032, "train.checkpoint_kimg": 0, "sample.num_images": 4,
            "sample.nfe": (1,), "backbone.depth": 2, "backbone.hidden_size": 32, "backbone.num_heads": 2,
            "train.cpu_threads": 1}   # bit-exact comparisons between runs need one thread count
    sets.update(overrides)
    return apply_overrides(cfg, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in sets.items()])


def read_log(run):
    """Every record of the run's ``log.jsonl``: status records and events (``start``, ``stopped``, …)."""
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_reduces_the_loss_and_writes_the_run(fashion_dir, tmp_path):
    cfg = tiny(fashion_dir, **{"train.total_kimg": 0.64, "train.lr": 3e-3})
    result = train(cfg, tmp_path / "run", show_progress=False)
    start, *log = read_log(tmp_path / "run")
    assert start["event"] == "start" and start["processes"] == 1 and "event" not in log[0]
    assert result.step == 40 and abs(result.kimg - 0.64) < 1e-9
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config_from_dict(saved["config"]) == cfg
    assert saved["data_spec"]["resolution"] == 32 and saved["data_spec"]["num_classes"] == 10
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    assert result.checkpoint is not None and result.checkpoint.name == "checkpoint-00000040"


def test_resume_is_bit_exact(fashion_dir, tmp_path, monkeypatch):
    # 8 steps straight vs 4 + resume + 4: same batches in the same order, and bit-identical weights, EMA,
    # optimizer state, RNG states and data position (test_reliability.py resumes after faults).
    batches = []
    original = FlowMatching.forward
    monkeypatch.setattr(FlowMatching, "forward", lambda self, x, y, g=None, n=0: batches.append(
        (x.clone(), y.clone())) or original(self, x, y, g, n))
    straight = train(tiny(fashion_dir), tmp_path / "a", show_progress=False)
    seen_straight, batches[:] = list(batches), []
    train(tiny(fashion_dir, **{"train.total_kimg": 0.064}), tmp_path / "b", show_progress=False)
    resumed = train(tiny(fashion_dir), tmp_path / "b", show_progress=False)
    assert resumed.step == straight.step == 8 and len(batches) == 8
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen_straight, batches))
    for name in ("objective.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"):
        sa = load_file(straight.checkpoint / name)
        sb = load_file(resumed.checkpoint / name)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs after resume"
    ma, mb = (json.loads((r.checkpoint / "manifest.json").read_text()) for r in (straight, resumed))
    assert ma["optimizer"] == mb["optimizer"] and ma["data_position"] == mb["data_position"] == 128


def test_gradient_accumulation_consumes_the_whole_global_batch(fashion_dir, tmp_path):
    # batch 16 as 4 micro-batches of 4: 2 optimizer steps for 32 images, and the data stream has
    # advanced by exactly the images counted (the official TVM loop counts images it never trains on).
    res = train(tiny(fashion_dir, **{"train.total_kimg": 0.032, "train.batch_per_gpu": 4}),
                tmp_path / "acc", show_progress=False)
    manifest = json.loads((res.checkpoint / "manifest.json").read_text())
    assert res.step == 2 and manifest["nimg"] == 32 and manifest["data_position"] == 32


def test_resuming_with_another_config_is_refused(fashion_dir, tmp_path):
    train(tiny(fashion_dir, **{"train.total_kimg": 0.032}), tmp_path / "r", show_progress=False)
    with pytest.raises(ConfigError, match=r"different config \(train.lr: 0.001 → 0.002"):
        train(tiny(fashion_dir, **{"train.lr": 2e-3}), tmp_path / "r", show_progress=False)


def test_batch_that_does_not_divide_is_refused(fashion_dir):
    cfg = tiny(fashion_dir, **{"train.batch": 10, "train.batch_per_gpu": 4})
    with pytest.raises(ConfigError, match=r"train.batch=10 must be divisible by devices \(1\) × train.batch_per_gpu \(4\)"):
        plan_batches(cfg, 1)
    assert plan_batches(tiny(fashion_dir, **{"train.batch": 16, "train.batch_per_gpu": 4}), 2).accumulation == 2


def test_compile_and_activation_checkpointing_train_the_same_run(fashion_dir, tmp_path, monkeypatch):
    """train.compile and train.activation_checkpointing change speed and memory, not the experiment:
    the same losses (to float rounding) as a plain run, and a plain run resumes under them."""
    import fewstep.train.loop as loop

    compiled = []
    monkeypatch.setattr(loop, "compile_objective", lambda obj, tuning=False: compiled.append((obj, tuning)) or 0)
    plain = train(tiny(fashion_dir, **{"train.total_kimg": 0.032}), tmp_path / "a", show_progress=False)
    fast = train(tiny(fashion_dir, **{"train.total_kimg": 0.032, "train.compile": True, "train.compile_tuning": True,
                                      "train.activation_checkpointing": True}), tmp_path / "b", show_progress=False)
    assert len(compiled) == 1 and compiled[0][1] is True
    assert fast.loss == pytest.approx(plain.loss, rel=1e-5)
    resumed = train(tiny(fashion_dir, **{"train.total_kimg": 0.064, "train.activation_checkpointing": True}),
                    tmp_path / "a", show_progress=False)
    assert resumed.kimg == pytest.approx(0.064)
