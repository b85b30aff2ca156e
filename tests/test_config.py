"""Config: round trips, overrides with type checks, errors with suggestions."""
from __future__ import annotations

import json

import pytest

from fewstep.config import ConfigError, apply_overrides, run_config_from_dict, to_dict
from fewstep.registry import recipes


@pytest.mark.parametrize("name,objective", [("smoke", None), ("fashion-mnist", None), ("imagenet-256-imf-b2", None),
                                            ("imagenet-256-imf-xl2", None), ("imagenet-256-alphaflow-xl2", None),
                                            ("imagenet-256-dmf-xl2", None), ("imagenet-256-dmf-xl2", "fm"),
                                            ("toy2d", "shortcut"), ("fashion-mnist-sweep", "alphaflow")])
def test_recipe_round_trip_is_exact(name, objective):
    from fewstep.build import resolve

    cfg = resolve(recipes.get(name)(objective) if objective else recipes.get(name)())
    data = json.loads(json.dumps(to_dict(cfg)))
    back = run_config_from_dict(data)
    assert back == cfg
    assert type(back.objective) is type(cfg.objective)
    assert type(back.backbone) is type(cfg.backbone)


def test_overrides_are_typed():
    cfg = recipes.get("smoke")()
    apply_overrides(cfg, ["train.lr=2e-4", "train.betas=(0.9,0.99)", "train.grad_clip=none",
                          "backbone.qk_norm=true", "train.ema_betas={'ema':0.9,'slow':0.99}",
                          "objective.label_dropout=0.2", "sample.nfe=(1,2)", "train.total_kimg=3"])
    assert cfg.train.lr == 2e-4 and cfg.train.betas == (0.9, 0.99) and cfg.train.grad_clip is None
    assert cfg.backbone.qk_norm is True and cfg.train.ema_betas == {"ema": 0.9, "slow": 0.99}
    assert cfg.objective.label_dropout == 0.2 and cfg.sample.nfe == (1, 2)
    assert isinstance(cfg.train.total_kimg, float)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown key 'lrr' in train; did you mean 'lr'"),
    ("trian.lr=1", r"did you mean 'train'"),
    ("train.batch=abc", r"train.batch must be an integer, got 'abc'"),
    ("train.batch=1.5", r"train.batch must be an integer"),
    ("train.precision=fp8", r"train.precision must be one of 'bf16', 'fp32'"),
    ("backbone.qk_norm=3", r"backbone.qk_norm must be true or false"),
    ("train.betas=(0.9,)", r"needs 2 values"),
    ("objective.nonsense=1", r"unknown key 'nonsense' in objective"),
    ("train.lr", r"not of the form section.field=value"),
    ("objective.name=tvm", r"change the objective with --objective"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(recipes.get("smoke")(), [override])


def test_unknown_keys_in_saved_config_are_errors():
    data = to_dict(recipes.get("smoke")())
    data["train"]["warmup"] = 3
    with pytest.raises(ConfigError, match="unknown key 'warmup' in train"):
        run_config_from_dict(data)
    data = to_dict(recipes.get("smoke")())
    data["extra"] = {}
    with pytest.raises(ConfigError, match="unknown key 'extra' in run config"):
        run_config_from_dict(data)
