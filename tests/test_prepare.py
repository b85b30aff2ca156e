"""``fewstep prepare`` end to end on a tiny random AutoencoderKL and a generated image folder: encode →
store → load → decode; resuming an interrupted run; the split over ranks and the merge; VAE loading errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.config import DataConfig
from fewstep.data import DataError, DataNotFoundError, load_dataset
from latents_helpers import save_tiny_vae, write_image_folder

datasets = pytest.importorskip("datasets", reason="prepare needs HF datasets (pip install 'fewstep[hf]')")
pytest.importorskip("diffusers", reason="prepare needs diffusers (pip install 'fewstep[latent]')")
from fewstep.data.prepare import encode_rank, make_settings, prepare_latents   # noqa: E402
from fewstep.data.store import check_settings, merge_shards   # noqa: E402
from fewstep.data.vae import LatentDecoder, encode_posterior, load_vae   # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KW = dict(resolution=32, batch_size=2, shard_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An image folder (6 + 4 images of random sizes ≥ 32 px, 2 classes), a saved tiny VAE, an HF cache."""
    root = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-cache")
        yield {"images": write_image_folder(root / "images", {"cat": 6, "dog": 4}),
               "vae": str(save_tiny_vae(root / "vae")), "root": root}


@pytest.fixture(scope="module")
def prepared(assets):
    out = assets["root"] / "prepared"
    prepare_latents(f"imagefolder:{assets['images']}", out, vae=assets["vae"], **KW)
    return out


def table(out: Path) -> dict:
    hf = datasets.load_from_disk(str(out)).with_format("numpy")
    return {k: hf[k][:] for k in hf.column_names}


def same_result(a: Path, b: Path) -> None:
    ta, tb = table(a), table(b)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((d / "latents.json").read_text()) for d in (a, b))
    assert ma["raw_mean"] == mb["raw_mean"] and ma["raw_std"] == mb["raw_std"]


def test_encode_store_load_decode(assets, prepared):
    meta = json.loads((prepared / "latents.json").read_text())
    assert (meta["resolution"], meta["latent_shape"], meta["num_items"], meta["shards"]) == (32, [4, 4, 4], 10, 3)
    assert meta["class_names"] == ["cat", "dog"] and meta["vae"] == assets["vae"]
    # the stored posterior is the VAE's, on the ADM centre crop of each image (u8/127.5 − 1)
    source = load_dataset(DataConfig(name=f"imagefolder:{assets['images']}", resolution=32))
    vae = load_vae(assets["vae"])
    pixels = torch.stack([source[i][0] for i in range(10)])
    mean, std = encode_posterior(vae, pixels)
    t = table(prepared)
    np.testing.assert_allclose(t["mean"], mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["std"], std.numpy(), rtol=1e-5, atol=1e-6)
    assert (t["std"] > 0).all() and t["label"].tolist() == [0] * 6 + [1] * 4 and t["index"].tolist() == list(range(10))
    # load as a training dataset, draw, decode to images of the source resolution
    ds = load_dataset(DataConfig(name=f"latents:{prepared}"))
    assert (ds.spec.channels, ds.spec.resolution, ds.spec.num_classes, ds.spec.kind) == (4, 4, 2, "latents")
    x = torch.stack([ds[i][0] for i in range(10)])
    assert torch.isfinite(x).all() and 0.3 < x.std() < 3   # normalised with the measured statistics
    images = LatentDecoder(ds.latent_format, vae=vae, device="cpu")(x)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8 and images.float().std() > 0


def test_interrupted_prepare_resumes_without_reencoding(assets, prepared, tmp_path):
    out = tmp_path / "out"
    batches = []

    def interrupt(n):
        batches.append(n)
        if len(batches) == 3:   # shard 0 (2 batches) is finished, shard 1 is half done
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_latents(f"imagefolder:{assets['images']}", out, vae=assets["vae"], on_batch=interrupt, **KW)
    assert (out / ".prepare" / "shard-00000.json").is_file() and not (out / "latents.json").exists()
    with pytest.raises(DataNotFoundError, match="unfinished"):
        load_dataset(DataConfig(name=f"latents:{out}"))
    encoded = []
    prepare_latents(f"imagefolder:{assets['images']}", out, vae=assets["vae"], on_batch=encoded.append, **KW)
    assert sum(encoded) == 6   # shards 1 (4 items) and 2 (2 items); shard 0 was not encoded again
    same_result(out, prepared)
    again = []
    prepare_latents(f"imagefolder:{assets['images']}", out, vae=assets["vae"], on_batch=again.append, **KW)
    assert again == []   # a finished directory is left alone
    def stop(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_latents(f"imagefolder:{assets['images']}", tmp_path / "out2", vae=assets["vae"], on_batch=stop, **KW)
    with pytest.raises(DataError, match=r"other settings \(shard_size: 4 → 3\)"):
        prepare_latents(f"imagefolder:{assets['images']}", tmp_path / "out2", vae=assets["vae"],
                        **{**KW, "shard_size": 3})


def test_two_ranks_then_merge_equal_one_process(assets, prepared, tmp_path):
    out = tmp_path / "ranks"
    source = load_dataset(DataConfig(name=f"imagefolder:{assets['images']}", resolution=32))
    vae = load_vae(assets["vae"])
    s = make_settings(f"imagefolder:{assets['images']}", "train", 32, assets["vae"], source, vae, shard_size=4,
                      dtype="float32", seed=0, limit=None)
    out.mkdir()
    check_settings(out, s, write=True)
    assert encode_rank(out, s, source, vae, 1, 2, batch_size=2) == 4   # shard 1
    with pytest.raises(DataError, match=r"2 of 3 shards are not encoded yet \(first: \[0, 2\]\)"):
        merge_shards(out)
    assert encode_rank(out, s, source, vae, 0, 2, batch_size=3) == 6   # shards 0 and 2 (batch size is free)
    merge_shards(out)
    ta, tb = table(out), table(prepared)
    assert all(np.array_equal(ta[k], tb[k]) for k in ("label", "index"))
    np.testing.assert_allclose(ta["mean"], tb["mean"], rtol=1e-5, atol=1e-6)
    meta_a, meta_b = (json.loads((d / "latents.json").read_text()) for d in (out, prepared))
    np.testing.assert_allclose(meta_a["raw_mean"], meta_b["raw_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta_a["raw_std"], meta_b["raw_std"], rtol=1e-5)


def test_bad_inputs_are_refused(assets, tmp_path):
    with pytest.raises(DataError, match="multiple of the VAE's factor 8"):
        prepare_latents(f"imagefolder:{assets['images']}", tmp_path / "a", vae=assets["vae"], **{**KW, "resolution": 36})
    with pytest.raises(DataError, match="float32 or float16"):
        prepare_latents(f"imagefolder:{assets['images']}", tmp_path / "b", vae=assets["vae"], dtype="int8", **KW)


def test_vae_loading_errors(assets, tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="has no config.json"):
        load_vae(str(tmp_path))
    pipeline = tmp_path / "pipeline"   # a diffusers pipeline folder: the VAE is its vae/ sub-folder
    save_tiny_vae(pipeline / "vae")
    assert load_vae(str(pipeline)).config.latent_channels == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"(?s)not in the local Hugging Face cache and the Hub is offline.*--vae DIR"):
        load_vae("stabilityai/sd-vae-ft-ema")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(DataError, match=r"pip install 'fewstep\[latent\]'"):
        load_vae(assets["vae"])


def test_cli_prepare(assets, tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["prepare", "--data", f"imagefolder:{assets['images']}", "--out", str(out),
                                      "--resolution", "32", "--vae", assets["vae"], "--workers", "0",
                                      "--limit", "5", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"--data latents:{out}" in result.output and len(load_dataset(DataConfig(name=f"latents:{out}"))) == 5
    bad = CliRunner().invoke(app, ["prepare", "--data", f"imagefolder:{tmp_path / 'nope'}", "--out", str(out / "x"),
                                   "--vae", assets["vae"]])
    assert bad.exit_code == 2 and "is not a directory" in bad.output


def test_training_on_prepared_latents(prepared, tmp_path):
    from fewstep.registry import recipes
    from fewstep.train import train

    cfg = recipes.get("smoke")("fm")
    cfg.data = DataConfig(name=f"latents:{prepared}")
    cfg.backbone.patch_size, cfg.backbone.depth, cfg.backbone.hidden_size = 2, 1, 32
    cfg.train.total_kimg, cfg.train.batch, cfg.sample.num_images = 0.008, 4, 2
    result = train(cfg, tmp_path / "run", show_progress=False)
    assert result.step == 2 and (tmp_path / "run" / "samples" / "final.png").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_match_one(assets, prepared, tmp_path):
    """Two gloo ranks under torchrun split the shards and the main one merges (≈ 20 s on 2 CPU cores)."""
    out = tmp_path / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(assets["root"] / "hf-cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fewstep.cli", "prepare",
           "--data", f"imagefolder:{assets['images']}", "--out", str(out), "--resolution", "32", "--vae",
           assets["vae"], "--batch", "2", "--shard-size", "4", "--workers", "0", "--no-progress"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    same_result(out, prepared)
