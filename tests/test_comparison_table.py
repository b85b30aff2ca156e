"""scripts/comparison-table.py: the CPU Fashion-MNIST preset scales every schedule stated in images to the
run's budget (a curriculum made for 300 000 kimg would leave α-Flow a flow-matching model after 12)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fewstep.build import build_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "comparison-table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("comparison_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_fmnist_members_have_their_schedules_scaled_to_the_budget():
    script = load_script()
    preset = script.PRESETS["cpu-fmnist"]
    members = {m.get("name", m["objective"]): m for m in script.members(preset["recipe"], preset["schedule_kimg"])}
    assert {"fm", "tvm", "alphaflow", "ect", "scm", "dmf", "tvm-released", "meanflow-released"} <= set(members)
    assert members["dmf"]["init_from"] == "fm"
    kimg = preset["schedule_kimg"]
    cfgs = {name: build_config(preset["recipe"], m["objective"], None, None, None, None, m.get("overrides", []))
            for name, m in members.items()}
    assert (cfgs["alphaflow"].objective.alpha_start_kimg, cfgs["alphaflow"].objective.alpha_end_kimg) == (0, kimg)
    assert cfgs["ect"].objective.stage_kimg == kimg / 8
    assert cfgs["scm"].objective.warmup_kimg == kimg / 10
    assert cfgs["meanflow-released"].objective.label_dropout_samples == "first"


def test_gpu_preset_keeps_the_recipes_schedules():
    script = load_script()
    preset = script.PRESETS["gpu"]
    members = script.members(preset["recipe"], preset["schedule_kimg"])
    alpha = next(m for m in members if m["objective"] == "alphaflow")
    assert not alpha.get("overrides")    # fashion-mnist-sweep already scales them (to 300 kimg)
