"""Python API and export: fewstep.load(...).sample equals `fewstep sample`; export → load → sample equals
the run's images; the model card holds the run's facts; `--push-to-hub` refuses at once offline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fewstep
from fewstep.cli import app
from fewstep.export import export_model

runner = CliRunner()

TINY = ["--set", "backbone.depth=1", "--set", "backbone.hidden_size=32", "--set", "backbone.num_heads=2",
        "--set", "train.status_kimg=0.016", "--set", "sample.num_images=4", "--set", "sample.nfe=(1,)"]


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.fixture(scope="module")
def trained(fashion_dir, tmp_path_factory):
    """A 2-step TVM run on the tiny Fashion-MNIST-like data (class-conditional, guidance input, EMA track)."""
    out = tmp_path_factory.mktemp("export") / "run"
    res = run("train", "--recipe", "smoke", "--objective", "tvm", "--kimg", "0.032", "--batch", "16", "--out", out,
              "--no-progress", "--set", f"data.root={fashion_dir}", *TINY)
    assert res.exit_code == 0, res.output
    return out


def test_load_and_sample_equals_the_cli(trained, tmp_path):
    tensors = tmp_path / "s.safetensors"
    res = run("sample", "--run", trained, "--nfe", "1,2", "--seeds", "0-5", "--out", tmp_path / "g.png",
              "--batch", "4", "--device", "cpu", "--save-tensor", tensors)
    assert res.exit_code == 0, res.output
    cli = load_file(str(tensors))
    model = fewstep.load(trained, device="cpu")
    assert model.weights == "ema" and model.config.objective.name == "tvm" and model.objective.training is False
    for nfe in (1, 2):
        images = model.sample(range(6), nfe=nfe, batch=5)        # another batch size: the same images
        assert images.dtype == torch.uint8 and images.shape == (6, 1, 32, 32)
        assert torch.equal(images, cli[f"pixels{nfe}"])
    # labels: one class for all, one per seed; a seed's image depends only on its seed and label
    per_seed = model.sample([3, 4], labels=[2, 7])
    assert torch.equal(per_seed[0], model.sample([3], labels=2)[0])
    assert torch.equal(per_seed[1], model.sample("4", labels=[7])[0])
    with pytest.raises(ValueError, match="2 labels for 3 seeds"):
        model.sample([0, 1, 2], labels=[1, 2])
    with pytest.raises(ValueError, match="valid: online, ema"):
        fewstep.load(trained, weights="slow", device="cpu")


def test_the_grid_png_holds_the_images_exactly_and_labels_its_blocks(trained, tmp_path):
    from PIL import Image

    from fewstep.images import make_grid

    res = run("sample", "--run", trained, "--nfe", "1,4", "--seeds", "0-8", "--out", tmp_path / "g.png",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    model = fewstep.load(trained, device="cpu")
    grid = make_grid([model.sample(range(9), nfe=n) for n in (1, 4)]).expand(3, -1, -1).permute(1, 2, 0).numpy()
    png = np.array(Image.open(tmp_path / "g.png"))[..., :3]
    h, w, _ = grid.shape
    hits = [(r, c) for r in range(png.shape[0] - h + 1) for c in range(png.shape[1] - w + 1)
            if (png[r, c] == grid[0, 0]).all() and (png[r:r + h, c:c + w] == grid).all()]
    assert len(hits) == 1
    r, c = hits[0]
    assert c > 30 and r > 10                       # a label margin on the left, a title above
    assert (png[:, : c - 2] < 128).any()           # dark text: the block labels


def test_export_load_sample_equals_the_run(trained, tmp_path):
    out = tmp_path / "model"
    res = run("export", "--run", trained, "--out", out, "--grid", "4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights and not any(k.startswith(("ema.", "teacher", "backbone.")) for k in weights)
    ckpt_keys = load_file(str(next(trained.glob("checkpoint-*")) / "objective.safetensors"))
    assert all(torch.equal(v, ckpt_keys[f"ema.ema.{k}"]) for k, v in weights.items())
    assert len(weights) < len(ckpt_keys) / 2          # no online weights, teacher or optimizer
    exported, original = fewstep.load(out, device="cpu"), fewstep.load(trained, device="cpu")
    for nfe in (1, 2):
        assert torch.equal(exported.sample(range(5), nfe=nfe), original.sample(range(5), nfe=nfe))
    assert torch.equal(exported.sample([1, 2], labels=3, guidance=1.5), original.sample([1, 2], labels=3, guidance=1.5))
    # the CLI's sample command reads it too, and the other weights are refused by name
    res = run("sample", "--run", out, "--seeds", "0-3", "--out", tmp_path / "g.png", "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run("sample", "--run", out, "--weights", "online", "--out", tmp_path / "g.png")
    assert res.exit_code == 2 and "holding only its 'ema' weights" in flat(res.output)
    # a corrupted weights file is caught
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupted"):
        fewstep.load(out, device="cpu")


def test_model_card_holds_the_runs_facts(trained, tmp_path):
    (trained / "fid.json").write_text(json.dumps({"fid": {"1": 123.456, "2": 98.7}, "num": 500, "weights": "ema",
                                                  "checkpoint": {"step": 2}, "dataset": "fashion-mnist",
                                                  "extractor": {"extractor": "inception"}}))
    try:
        out = export_model(trained, tmp_path / "m", grid=0, device="cpu")
    finally:
        (trained / "fid.json").unlink()
    card = (out / "README.md").read_text()
    body = json.loads((out / "config.json").read_text())
    params = sum(v.numel() for v in load_file(str(out / "model.safetensors")).values())
    assert body["parameters"] == params and body["step"] == 2 and body["weights"] == "ema"
    for fact in ("library_name: fewstep", "| objective | `tvm` |", "| backbone | `dit-debug` |",
                 "| data | `fashion-mnist` (1×32×32 pixels, 10 classes) |", "| images seen | 32 images (0.032 kimg, 2 ",
                 f"| parameters | {params:,} |", "| FID | 123.5 | 98.7 | 500 |", "fewstep.load(\"THIS_DIR\")"):
        assert fact in card, fact
    assert "samples.png" not in card


def test_push_to_hub_offline_fails_at_once(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("export", "--run", trained, "--out", tmp_path / "m", "--push-to-hub", "me/model")
    assert res.exit_code == 2
    assert "--push-to-hub me/model needs the Hugging Face Hub, but it is switched off" in flat(res.output)
    assert not (tmp_path / "m").exists()          # refused before any work


def test_eval_accepts_an_exported_model(trained, tmp_path):
    from fewstep.evaluate_images import evaluate_fid, make_reference
    from fewstep.config import DataConfig

    out = export_model(trained, tmp_path / "m", grid=0, device="cpu")
    data = json.loads((trained / "config.json").read_text())["config"]["data"]
    ref = tmp_path / "ref.npz"
    make_reference(DataConfig(name="fashion-mnist", root=data["root"]), ref, extractor="random-projection", num=64,
                   show_progress=False)
    body = evaluate_fid(out, [1], 16, ref, extractor="random-projection", show_progress=False)
    assert (out / "fid.json").is_file() and body["checkpoint"]["step"] == 2
