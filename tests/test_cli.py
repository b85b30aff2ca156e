"""The CLI through typer's test runner: list, train, sample, and bad input."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fewstep.cli import app

runner = CliRunner()

TINY = ["--set", "backbone.depth=1", "--set", "backbone.hidden_size=32", "--set", "backbone.num_heads=2",
        "--set", "train.status_kimg=0.016", "--set", "sample.num_images=4", "--set", "sample.nfe=(1,)"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_list_shows_every_kind():
    res = run("list")
    assert res.exit_code == 0
    for word in ("objectives", "backbones", "datasets", "recipes", "fm", "dit-xl", "fashion-mnist", "smoke"):
        assert word in res.output
    objectives = run("list", "objectives").output
    assert all(name in objectives for name in ("fm", "tvm", "meanflow", "scm", "ect"))
    bad = run("list", "objectivs")
    assert bad.exit_code == 2 and "did you mean 'objectives'" in bad.output


def test_tvm_on_dit_xl_resolves_with_the_embedders_it_needs():
    res = run("train", "--objective", "tvm", "--backbone", "dit-xl", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)   # stderr may warn that this CPU's memory would not hold the run
    assert cfg["objective"]["name"] == "tvm" and cfg["objective"]["teacher_beta"] == 0.99
    assert cfg["backbone"]["depth"] == 28 and cfg["backbone"]["hidden_size"] == 1152
    assert cfg["backbone"]["gap_embedder"] and cfg["backbone"]["guidance_embedder"]


def test_dry_run_prints_the_resolved_config():
    res = run("train", "--recipe", "smoke", "--backbone", "dit-s", "--kimg", "5", "--batch", "32", "--set", "train.lr=3e-4", "--dry-run")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["backbone"]["name"] == "dit-s" and cfg["backbone"]["depth"] == 12
    assert cfg["backbone"]["patch_size"] == 4          # the recipe's switch survives the flavour change
    assert cfg["train"]["total_kimg"] == 5.0 and cfg["train"]["batch"] == 32 and cfg["train"]["lr"] == 3e-4


@pytest.mark.parametrize("args, message", [
    (["--objective", "flow"], "unknown objective 'flow'"),
    (["--backbone", "dit-xxl"], "did you mean 'dit-xl'"),
    (["--recipe", "smok"], "did you mean 'smoke'"),
    (["--set", "train.bach=3"], "did you mean 'batch'"),
    (["--data", "fashion-mnits"], "did you mean 'fashion-mnist'"),
])
def test_bad_names_and_keys_fail_with_suggestions(args, message, tmp_path):
    res = run("train", *args, "--out", tmp_path / "x", "--no-progress")
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_train_then_sample(fashion_dir, tmp_path):
    out = tmp_path / "run"
    res = run("train", "--kimg", "0.032", "--batch", "16", "--out", out, "--no-progress",
              "--set", f"data.root={fashion_dir}", *TINY)
    assert res.exit_code == 0, res.output
    assert "done: 0.0 kimg, 2 steps, loss" in res.output
    grid = tmp_path / "grid.png"
    res = run("sample", "--run", out, "--nfe", "1,4", "--seeds", "0-8", "--out", grid, "--batch", "4")
    assert res.exit_code == 0, res.output
    assert "9 images × [1 NFE (1 evaluations), 4 NFE (4 evaluations)]" in " ".join(res.output.split())
    from imagefiles import find_block, read_rgb

    from fewstep.images import make_grid
    from fewstep.model import load

    model = load(out, device="cpu")
    blocks = make_grid([model.sample(range(9), nfe=n) for n in (1, 4)])   # two 3×3 blocks of 32-px images
    assert blocks.shape == (1, 2 * (3 * 34 + 2) + 4, 3 * 34 + 2)
    assert len(find_block(read_rgb(grid), blocks.expand(3, -1, -1).permute(1, 2, 0).numpy())) == 1
    missing = run("sample", "--run", tmp_path / "nope", "--out", grid)
    assert missing.exit_code == 2 and "no such run" in missing.output
