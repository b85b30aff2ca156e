"""Learning-rate and EMA schedules in kimg: closed forms, batch independence of half-lives, edm2's
power-function EMA, every recipe unchanged, and the trainer applying them."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fewstep.build import check_compatible
from fewstep.checkpoints import latest_checkpoint
from fewstep.config import ConfigError, TrainConfig, apply_overrides, to_dict
from fewstep.registry import objectives, recipes
from fewstep.ema import ema_tracks, halflife_beta, power_beta, power_std_to_exponent
from fewstep.schedules import TrainingSchedule, lr_at

IN_TREE = ("fm", "tvm", "meanflow", "scm", "ect")


def test_constant_warmup_cosine_and_rsqrt_learning_rates():
    t = TrainConfig(total_kimg=100, lr=1e-3)
    assert [lr_at(t, k) for k in (0, 5, 100)] == [1e-3] * 3
    warm = dataclasses.replace(t, lr_warmup_kimg=10)
    assert lr_at(warm, 0) == 0 and lr_at(warm, 2.5) == pytest.approx(2.5e-4) and lr_at(warm, 50) == 1e-3
    cos = dataclasses.replace(t, lr_schedule="cosine", lr_warmup_kimg=10, lr_min=1e-5)
    assert lr_at(cos, 10) == pytest.approx(1e-3)                              # decay starts after the warm-up
    assert lr_at(cos, 55) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)        # half way: cos(π/2) = 0
    assert lr_at(cos, 32.5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cos, 100) == pytest.approx(1e-5) and lr_at(cos, 200) == pytest.approx(1e-5)
    short = dataclasses.replace(cos, lr_decay_kimg=20)
    assert lr_at(short, 30) == pytest.approx(1e-5)
    rsqrt = dataclasses.replace(t, lr_schedule="rsqrt", lr_decay_kimg=4)
    assert lr_at(rsqrt, 3) == 1e-3 and lr_at(rsqrt, 16) == pytest.approx(1e-3 / 2)
    assert lr_at(rsqrt, 100) == pytest.approx(1e-3 / 5)


def test_half_life_forgets_the_same_per_image_whatever_the_batch():
    """After N images the initial weights weigh 0.5^(N / h) for every batch (a per-step decay does not)."""
    h, images = 2.0, 8192
    for batch in (32, 64, 256):
        steps = images // batch
        weight = math.prod(halflife_beta(h, batch, (i + 1) * batch) for i in range(steps))
        assert weight == pytest.approx(0.5 ** (images / (h * 1000)), rel=1e-12)
    per_step = {b: 0.999 ** (images // b) for b in (32, 256)}
    assert per_step[32] < 0.8 * per_step[256]   # the same decay per step forgets 8x faster at batch 32
    # The ramp-up caps the half-life at ratio × images seen (EDM's 0.05).
    assert halflife_beta(500, 512, 10_000, rampup_ratio=0.05) == pytest.approx(0.5 ** (512 / 500))


@pytest.mark.parametrize("std", [0.05, 0.10])
def test_power_function_ema_has_the_relative_width_it_was_asked_for(std):
    gamma = power_std_to_exponent(std)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(std, rel=1e-12)
    # The profile the per-step decays build over a run of T steps: weight of step i in the final average.
    steps, batch = 20_000, 64
    betas = torch.tensor([power_beta(gamma, batch, (i + 1) * batch) for i in range(steps)], dtype=torch.float64)
    later = torch.cat([torch.cumprod(betas.flip(0), 0).flip(0)[1:], torch.ones(1, dtype=torch.float64)])
    weights = (1 - betas) * later
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-9) and float(betas[0]) == 0.0
    x = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    mean = float((weights * x).sum())
    assert math.sqrt(float((weights * (x - mean) ** 2).sum())) == pytest.approx(std, rel=2e-3)
    assert power_beta(0.0, 1, 4) == pytest.approx(0.75)                  # γ = 0: the running mean


def test_bad_schedule_settings_fail_with_the_key():
    with pytest.raises(ConfigError, match="lr_decay_kimg"):
        TrainConfig(lr_schedule="rsqrt")
    with pytest.raises(ConfigError, match="defined twice"):
        TrainConfig(ema_betas={"ema": 0.99}, ema_halflife_kimg={"ema": 10.0})
    with pytest.raises(ConfigError, match="ema_power_std"):
        TrainConfig(ema_power_std={"p": 0.3})
    with pytest.raises(ConfigError, match="lr_schedule"):
        apply_overrides(recipes.get("smoke")(), ["train.lr_schedule=linear"])


def _recipe_configs():
    for entry in recipes.entries():
        for name in IN_TREE:
            yield entry.name, name, entry.obj(name)


def test_every_recipe_keeps_its_constant_lr_and_per_step_ema():
    """The schedules' defaults leave every registered recipe as it was: constant lr, per-step decays."""
    seen = 0
    for recipe, objective, cfg in _recipe_configs():
        t = cfg.train
        schedule = TrainingSchedule(t)
        assert not schedule.varies, (recipe, objective)
        assert (t.lr_schedule, t.lr_warmup_kimg, t.ema_halflife_kimg, t.ema_power_std) == ("constant", 0.0, {}, {})
        assert ema_tracks(t) == t.ema_betas and schedule.ema_betas(t.batch * 7) == {}
        assert all(lr_at(t, k) == t.lr for k in (0.0, t.batch / 1000, t.total_kimg / 3, t.total_kimg))
        seen += 1
    assert seen >= 5 * len(IN_TREE)


TINY = ["backbone.depth=1", "backbone.hidden_size=32", "backbone.num_heads=2", "sample.num_images=4",
        "sample.nfe=(1,)", "train.status_kimg=0.016"]


def _tiny(fashion_dir, *overrides):
    from fewstep.build import build_config

    return build_config("smoke", "fm", None, None, 0.064, 16, [f"data.root={fashion_dir}", *TINY, *overrides])


def test_default_schedule_leaves_training_bit_identical(fashion_dir, tmp_path, monkeypatch):
    """The trainer's schedule hook with the defaults gives the same checkpoint bytes as training without it."""
    from fewstep.train import train

    with_hook = train(_tiny(fashion_dir), tmp_path / "a", show_progress=False)
    monkeypatch.setattr(TrainingSchedule, "apply", lambda self, optimizer, objective, nimg: self.train.lr)
    without = train(_tiny(fashion_dir), tmp_path / "b", show_progress=False)
    for name in ("objective.safetensors", "optimizer.safetensors"):
        assert (with_hook.checkpoint / name).read_bytes() == (without.checkpoint / name).read_bytes()


def test_trainer_follows_the_schedule_and_keeps_every_track(fashion_dir, tmp_path):
    from fewstep.sample import sample
    from fewstep.build import load_objective
    from fewstep.train import train

    cfg = _tiny(fashion_dir, "train.lr_schedule=cosine", "train.lr_warmup_kimg=0.032", "train.lr_min=1e-5",
                "train.ema_halflife_kimg={'slow':0.05}", "train.ema_power_std={'ema_050':0.05}")
    result = train(cfg, tmp_path / "run", show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    status = [r for r in records if "event" not in r]
    assert len(status) == 4
    for r in status:   # one step per record: the logged lr is the schedule's at the step's end
        assert r["lr"] == pytest.approx(lr_at(cfg.train, r["kimg"]), rel=1e-6)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.manifest["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(cfg.train, result.kimg))
    names = {k.split(".")[1] for k in ckpt.tensors("objective.safetensors") if k.startswith("ema.")}
    assert names == {"ema", "slow", "ema_050"}
    objective, _, _ = load_objective(tmp_path / "run")
    tracks = {w: sample(objective, [0, 1], 1, weights=w).images for w in ("online", "ema", "slow", "ema_050")}
    assert not torch.equal(tracks["slow"], tracks["online"]) and not torch.equal(tracks["ema_050"], tracks["ema"])


def test_runs_from_before_the_schedules_still_resume():
    """A saved config without the schedule keys is the constant schedule: it compares equal."""
    cfg = recipes.get("smoke")("fm")
    saved = to_dict(cfg)
    for key in ("lr_schedule", "lr_warmup_kimg", "lr_decay_kimg", "lr_min", "ema_halflife_kimg",
                "ema_rampup_ratio", "ema_power_std"):
        del saved["train"][key]
    from fewstep.data.base import DataError  # noqa: F401  (the data spec is not compared here)

    check_compatible(saved, None, cfg, None, "old run")
    changed = apply_overrides(recipes.get("smoke")("fm"), ["train.lr_warmup_kimg=1"])
    with pytest.raises(ConfigError, match="lr_warmup_kimg"):
        check_compatible(saved, None, changed, None, "old run")
    assert objectives.get("fm")   # registry still loads after the recipe round trips
