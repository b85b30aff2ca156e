"""Latent datasets: the normalisation (docs/design/tvm.md §3), the prepared-directory reader, a fresh latent per step in
the batch stream (seeded by stream position, so resuming continues it), decoding to uint8 (§4), and the
ImageNet datasets and recipes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec
from fewstep.data import (IMAGENET_256, IMAGENET_512, BatchStream, DataError, DataNotFoundError, LatentFormat,
                          describe, latent_format_for, load_dataset, noise_seed)
from fewstep.images import to_uint8
from latents_helpers import random_posterior, tiny_vae

pytest.importorskip("datasets", reason="writing prepared latents needs HF datasets (pip install 'fewstep[hf]')")
from fewstep.data.prepare import write_latents   # noqa: E402
from fewstep.data.store import stats_seed   # noqa: E402

SHAPE = (4, 4, 4)


@pytest.fixture(autouse=True)
def no_env_data(monkeypatch):
    monkeypatch.delenv("FEWSTEP_DATA", raising=False)
    monkeypatch.delenv("FEWSTEP_VAE", raising=False)


def make_dir(path, n=7, shape=SHAPE, resolution=32, shard_size=3, dtype="float32", classes=3, seed=0):
    mean, std = random_posterior(n, shape, seed)
    labels = torch.arange(n) % classes
    write_latents(path, mean, std, labels, resolution=resolution, vae="tiny", num_classes=classes,
                  class_names=[f"c{i}" for i in range(classes)], shard_size=shard_size, dtype=dtype)
    return mean, std, labels


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------
def test_imagenet_constants_are_the_tvm_table():
    assert IMAGENET_256.raw_mean == (0.86488, -0.27787343, 0.21616915, 0.3738409)
    assert IMAGENET_256.raw_std == (4.85503674, 5.31922414, 3.93725398, 3.9870003)
    assert IMAGENET_512.raw_mean == (1.56, -0.695, 0.483, 0.729) and IMAGENET_512.raw_std == (5.27, 5.91, 4.21, 4.31)
    for fmt, r in ((IMAGENET_256, 256), (IMAGENET_512, 512)):
        assert fmt.final_std == 1.0 and fmt.vae == "stabilityai/sd-vae-ft-ema"
        assert fmt.resolution == r and fmt.latent_shape == (4, r // 8, r // 8)


@pytest.mark.parametrize("final_std", [1.0, 0.5])
def test_normalisation_matches_formula_and_round_trips(final_std):
    fmt = dataclasses.replace(IMAGENET_256, final_std=final_std)
    z = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5
    mean = torch.tensor(fmt.raw_mean, dtype=torch.float64).view(1, 4, 1, 1)
    std = torch.tensor(fmt.raw_std, dtype=torch.float64).view(1, 4, 1, 1)
    x = fmt.normalize(z)
    torch.testing.assert_close(x, (z - mean) / std * final_std, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fmt.denormalize(x), z, rtol=1e-14, atol=1e-13)
    scale, bias = fmt.scale_bias(z)   # docs/design/tvm.md §4: scale = final_std/raw_std, bias = −raw_mean·scale
    torch.testing.assert_close(scale, final_std / std)
    torch.testing.assert_close(bias, -mean * final_std / std)
    with pytest.raises(DataError, match="positive raw_std"):
        LatentFormat(vae="v", resolution=8, latent_shape=(2, 1, 1), raw_mean=(0.0, 0.0), raw_std=(1.0, 0.0))


# ---------------------------------------------------------------------------------------------------
# The prepared directory and its dataset
# ---------------------------------------------------------------------------------------------------
def test_store_round_trip_and_datasets_view(tmp_path):
    import datasets

    mean, std, labels = make_dir(tmp_path / "d")
    ds = load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}"))
    assert ds.spec == DataSpec(name=f"latents:{tmp_path / 'd'}", channels=4, resolution=4, num_classes=3,
                               num_items=7, kind="latents")
    idx = torch.tensor([6, 0, 3, 3, 5])   # across the three shards, with a repeat
    got_mean, got_std = ds.posterior(idx)
    assert torch.equal(got_mean, mean[idx]) and torch.equal(got_std, std[idx])
    stored, y = ds.get_stored(idx)
    assert torch.equal(stored, torch.cat([mean[idx], std[idx]], 1)) and torch.equal(y, labels[idx])
    hf = datasets.load_from_disk(str(tmp_path / "d")).with_format("torch")   # a plain HF dataset on disk
    assert hf.features["label"].names == ["c0", "c1", "c2"] and len(hf) == 7
    assert torch.equal(hf["mean"][:], mean) and torch.equal(hf["std"][:], std) and torch.equal(hf["index"][:], torch.arange(7))
    assert ds.class_names == ["c0", "c1", "c2"]
    info = describe(ds)
    assert info["shape"] == [4, 4, 4] and info["normalization"]["raw_std"] == list(ds.latent_format.raw_std)


def test_float16_storage_rounds_the_stored_values(tmp_path):
    mean, std, _ = make_dir(tmp_path / "h", dtype="float16")
    ds = load_dataset(DataConfig(name=f"latents:{tmp_path / 'h'}"))
    m, s = ds.posterior(torch.arange(7))
    assert torch.equal(m, mean.half().float()) and torch.equal(s, std.half().float())


def test_measured_statistics_are_the_population_moments_of_drawn_latents(tmp_path):
    mean, std, _ = make_dir(tmp_path / "s", n=7, shard_size=3)
    meta = load_dataset(DataConfig(name=f"latents:{tmp_path / 's'}")).meta
    eps = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(stats_seed(0, i))) for i in range(7)])
    z = (mean + std * eps).double().transpose(0, 1).reshape(4, -1)   # the oracle: ε of item i from seed (0, i)
    torch.testing.assert_close(torch.tensor(meta["raw_mean"], dtype=torch.float64), z.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.tensor(meta["raw_std"], dtype=torch.float64), z.std(1, correction=0),
                               rtol=1e-10, atol=1e-12)
    assert latent_format_for(DataConfig(name=f"latents:{tmp_path / 's'}")).raw_mean == tuple(meta["raw_mean"])


def test_missing_unfinished_and_mismatched_directories(tmp_path):
    with pytest.raises(DataNotFoundError, match="fewstep prepare"):
        load_dataset(DataConfig(name=f"latents:{tmp_path / 'none'}"))
    (tmp_path / "half" / ".prepare").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="unfinished"):
        load_dataset(DataConfig(name=f"latents:{tmp_path / 'half'}"))
    make_dir(tmp_path / "d")
    with pytest.raises(DataError, match="'train' split, not 'test'"):
        load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}", split="test"))
    with pytest.raises(DataError, match="prepared at 32 px"):
        load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}", resolution=64))


# ---------------------------------------------------------------------------------------------------
# A fresh latent every step, resumable
# ---------------------------------------------------------------------------------------------------
def test_stream_draws_a_fresh_latent_per_step_from_the_position_seed(tmp_path):
    mean, std, _ = make_dir(tmp_path / "d", n=4, shard_size=4)
    ds = load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}"))
    stream = BatchStream(ds, 4, seed=3)
    seen = {}
    for _ in range(3):
        position = stream.position
        idx = stream.indices.batch_at(position)
        x, y = next(stream)
        eps = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(noise_seed(3, 0, position)))
        ref = ds.latent_format.normalize((mean[idx] + std[idx] * eps).double())
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5)
        for i, row in zip(idx.tolist(), x):
            assert not any(torch.equal(row, old) for old in seen.get(i, [])), "a latent was reused"
            seen.setdefault(i, []).append(row)
    assert ds[2][0].shape == SHAPE and torch.equal(ds[2][0], ds[2][0])   # dataset[i] is deterministic


def test_stream_resume_prefetch_and_ranks_give_the_same_latents(tmp_path):
    make_dir(tmp_path / "d", n=6)
    ds = load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}"))
    full = [next(s) for s in [BatchStream(ds, 2, seed=1)] for _ in range(7)]
    first = BatchStream(ds, 2, seed=1)
    got = [next(first) for _ in range(3)]
    got += [next(s) for s in [BatchStream(ds, 2, seed=1, start_position=first.position, prefetch=2)] for _ in range(4)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, full))
    r0, r1 = BatchStream(ds, 1, seed=1, rank=0, world_size=2), BatchStream(ds, 1, seed=1, rank=1, world_size=2)
    for _ in range(3):   # each rank draws from its own (seed, rank, position) stream
        for r, stream in enumerate((r0, r1)):
            position, idx = stream.position, stream.indices.batch_at(stream.position)
            g = torch.Generator().manual_seed(noise_seed(1, r, position))
            assert torch.equal(next(stream)[0], ds.realize(ds.get_stored(idx)[0], g))
    assert noise_seed(1, 0, 0) != noise_seed(1, 1, 0) != noise_seed(2, 1, 0) != noise_seed(1, 1, 2)


# ---------------------------------------------------------------------------------------------------
# Decoding (docs/design/tvm.md §4) and sampling to uint8
# ---------------------------------------------------------------------------------------------------
def test_truncation_not_rounding():
    y = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    assert to_uint8(y, "truncate").flatten().tolist() == [0, 0, 127, 254, 255, 255]   # 127.5 → 127, 254.87 → 254
    assert to_uint8(y).flatten().tolist() == [0, 0, 128, 255, 255, 255]


def test_decoder_matches_a_float64_reference():
    from fewstep.data.vae import LatentDecoder

    vae = tiny_vae()
    fmt = LatentFormat(vae="tiny", resolution=32, latent_shape=SHAPE, raw_mean=(0.1, -0.2, 0.3, 0.0),
                       raw_std=(2.0, 1.5, 1.0, 0.5))
    x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = LatentDecoder(fmt, vae=vae, device="cpu", batch_size=2)(x)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.uint8
    with torch.no_grad():
        y = vae.double().decode(fmt.denormalize(x.double())).sample
    ref = ((y * 0.5 + 0.5).clamp(0, 1) * 255).floor()
    diff = (out.double() - ref).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() > 0.99
    with pytest.raises(ValueError, match="latents must be"):
        LatentDecoder(fmt, vae=vae)(torch.zeros(1, 4, 8, 8))


def test_sampling_a_latent_model_decodes_to_uint8(tmp_path):
    from fewstep.backbones.dit import DiTConfig
    from fewstep.config import RunConfig
    from fewstep.recipes.common import objective_config
    from fewstep.sample import output_decoder, sample
    from fewstep.build import build_objective
    from fewstep.data.vae import LatentDecoder

    make_dir(tmp_path / "d")
    data = DataConfig(name=f"latents:{tmp_path / 'd'}")
    spec = load_dataset(data).spec
    cfg = RunConfig(recipe="t", objective=objective_config("fm"), data=data,
                    backbone=DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=2))
    obj = build_objective(cfg, spec)
    decode = output_decoder(data, dataclasses.asdict(spec), device="cpu", vae=tiny_vae())
    assert isinstance(decode, LatentDecoder) and decode.fmt == latent_format_for(data)
    result = sample(obj, [0, 1, 2], 2, decode=decode)
    assert result.images.shape == (3, *SHAPE) and result.pixels.shape == (3, 3, 32, 32)
    assert result.pixels.dtype == torch.uint8
    assert output_decoder(DataConfig(), DataSpec("p", 1, 8, 0, 1)) is to_uint8


# ---------------------------------------------------------------------------------------------------
# ImageNet datasets and recipes
# ---------------------------------------------------------------------------------------------------
def test_imagenet_latents_use_the_paper_constants(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match=r"(?s)data.root and \$FEWSTEP_DATA are unset.*fewstep prepare"):
        load_dataset(DataConfig(name="imagenet-latents-256"))
    make_dir(tmp_path / "imagenet-latents-256", n=3, shape=(4, 32, 32), resolution=256, classes=1000)
    ds = load_dataset(DataConfig(name="imagenet-latents-256", root=str(tmp_path / "imagenet-latents-256")))
    assert ds.latent_format == IMAGENET_256 and ds.measured != IMAGENET_256
    assert (ds.spec.channels, ds.spec.resolution, ds.spec.num_classes, ds.spec.kind) == (4, 32, 1000, "latents")
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path))   # found as $FEWSTEP_DATA/imagenet-latents-256
    assert len(load_dataset(DataConfig(name="imagenet-latents-256"))) == 3
    with pytest.raises(DataError, match=r"shape \(4, 32, 32\) \(256 px\), but \(4, 64, 64\)"):
        load_dataset(DataConfig(name="imagenet-latents-512", root=str(tmp_path / "imagenet-latents-256")))


@pytest.mark.parametrize("recipe, resolution, guidance", [
    ("imagenet-256-tvm-w2", 256, 2.0), ("imagenet-256-tvm-w1p75", 256, 1.75),
    ("imagenet-512-tvm-w2p5", 512, 2.5), ("imagenet-512-tvm-w2p25", 512, 2.25)])
def test_imagenet_recipes_build_with_latent_shapes_and_constants(recipe, resolution, guidance):
    from fewstep.registry import recipes

    cfg = recipes.get(recipe)()
    assert cfg.data.name == f"imagenet-latents-{resolution}" and cfg.sample.guidance == guidance
    fmt = latent_format_for(cfg.data)
    assert fmt == {256: IMAGENET_256, 512: IMAGENET_512}[resolution]
    spec = DataSpec(name=cfg.data.name, channels=4, resolution=resolution // 8, num_classes=1000,
                    num_items=1_281_167, kind="latents")
    with torch.device("meta"):
        net = cfg.backbone.build(spec)
    assert (net.in_channels, net.input_size, net.num_classes) == (4, resolution // 8, 1000)
    assert (resolution // 8 // cfg.backbone.patch_size) ** 2 == {256: 256, 512: 1024}[resolution]   # tokens
    assert (cfg.train.grad_clip is not None) == (resolution == 512)


def test_in_memory_latents_match_the_prepared_directory(tmp_path):
    from fewstep.data import LatentDataset

    mean, std, labels = make_dir(tmp_path / "d")
    disk = load_dataset(DataConfig(name=f"latents:{tmp_path / 'd'}"))
    memory = LatentDataset.from_tensors(mean, std, labels, disk.latent_format, num_classes=3)
    idx = torch.tensor([5, 1, 1, 6])
    assert torch.equal(memory.get_stored(idx)[0], disk.get_stored(idx)[0]) and memory.spec.num_items == 7
    a, b = (next(BatchStream(d, 3, seed=4))[0] for d in (memory, disk))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="need mean and std"):
        LatentDataset.from_tensors(mean[:, :2], std, labels, disk.latent_format)
