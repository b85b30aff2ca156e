"""``fewstep bench data`` and the loader settings it measures: the prefetch thread gives the same batches,
raises a bad batch's error where it happened, and ends with its stream; the benchmark's numbers are
consistent with each other and it runs on the CPU with a note."""
from __future__ import annotations

import gc
import json
import threading
import time

import pytest
import torch

from fewstep.config import DataConfig
from fewstep.contracts import DataSpec
from fewstep.data import BatchStream, DataError, InMemoryImageDataset, load_dataset
from latents_helpers import random_posterior


def images(n: int = 12) -> InMemoryImageDataset:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return InMemoryImageDataset(x, torch.arange(n) % 3, name="toy", num_classes=3)


class NoBatch(torch.utils.data.Dataset):
    """The same items without ``get_batch`` (DataLoader path)."""

    def __init__(self, inner):
        self.inner, self.spec = inner, inner.spec

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


class BadAt(NoBatch):
    """``get_batch`` that fails on batches holding item ``bad``."""

    def __init__(self, inner, bad):
        super().__init__(inner)
        self.bad = bad

    def get_batch(self, indices):
        if self.bad in indices.tolist():
            raise DataError(f"item {self.bad} is corrupt")
        return self.inner.get_batch(indices)


def prefetch_threads() -> int:
    return sum(t.name == "fewstep-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("make", [images, lambda: NoBatch(images())], ids=["get_batch", "dataloader"])
def test_prefetch_gives_the_same_batches(make):
    plain, ahead = BatchStream(make(), 5, seed=2), BatchStream(make(), 5, seed=2, prefetch=3)
    for _ in range(7):
        (x0, y0), (x1, y1) = next(plain), next(ahead)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    ahead.close()
    restarted = [next(ahead) for _ in range(2)]   # after close() it continues from its position
    assert all(torch.equal(a[0], b[0]) for a, b in zip(restarted, [next(plain) for _ in range(2)]))


def test_prefetch_raises_at_the_bad_batch_and_threads_end():
    before = prefetch_threads()
    stream = BatchStream(BadAt(images(), bad=7), 4, seed=0, prefetch=2)
    order = torch.cat([stream.indices.batch_at(p) for p in (0, 4, 8)]).tolist()
    first_bad = order.index(7) // 4
    for _ in range(first_bad):
        next(stream)
    with pytest.raises(DataError, match="item 7 is corrupt"):
        next(stream)
    dropped = BatchStream(images(), 4, seed=0, prefetch=2)
    next(dropped)
    del dropped, stream   # no close(): the thread holds the stream weakly and ends with it
    gc.collect()
    deadline = time.time() + 5
    while prefetch_threads() > before and time.time() < deadline:
        time.sleep(0.05)
    assert prefetch_threads() == before


def test_bench_rows_are_consistent_on_cpu():
    from fewstep.bench.data import bench_data

    from logcapture import captured

    with captured() as lines:
        report = bench_data(images(64), batch=8, steps=5, warmup=1, workers=[0, 2], prefetch=[0, 2], step_ms=1.0,
                            device="cpu")
    assert any("no CUDA device" in m for m in lines) and any("workers do not apply" in m for m in lines)
    assert [(r["path"], r["workers"], r["prefetch"]) for r in report["rows"]] == [("in-process", 0, 0), ("in-process", 0, 2)]
    for r in report["rows"]:
        assert r["images_per_s"] == pytest.approx(r["batches_per_s"] * 8)
        assert r["wait_ms"] >= 0 and 0 <= r["stall_fraction"] < 1 and not r["pin_memory"]
        assert r["headroom"] == pytest.approx(r["images_per_s"] / (8 / 1e-3))
        assert r["stall_fraction"] == pytest.approx(r["wait_ms"] / (r["wait_ms"] + 1.0))
    loader = bench_data(NoBatch(images(64)), batch=8, steps=3, warmup=1, workers=[1], prefetch=[0], device="cpu")
    assert [(r["path"], r["workers"], r["prefetch"], r["wait_ms"]) for r in loader["rows"]] == [("dataloader", 1, 1, None)]


def test_cli_bench_data_on_prepared_latents(tmp_path):
    pytest.importorskip("datasets", reason="writing prepared latents needs HF datasets")
    from typer.testing import CliRunner

    from fewstep.cli import app
    from fewstep.data.prepare import write_latents

    mean, std = random_posterior(40, (4, 4, 4))
    write_latents(tmp_path / "lat", mean, std, torch.zeros(40, dtype=torch.int64), resolution=32, vae="tiny",
                  num_classes=0)
    assert load_dataset(DataConfig(name=f"latents:{tmp_path / 'lat'}")).spec == DataSpec(
        name=f"latents:{tmp_path / 'lat'}", channels=4, resolution=4, num_classes=0, num_items=40, kind="latents")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "data", "--data", f"latents:{tmp_path / 'lat'}", "--batch", "8",
                                      "--steps", "4", "--warmup", "1", "--prefetch", "0,2", "--step-ms", "2",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    assert body["kind"] == "latents" and body["shape"] == [4, 4, 4] and len(body["rows"]) == 2
    assert "img/s" in result.output and "wait" in result.output
    missing = CliRunner().invoke(app, ["bench", "data", "--data", f"latents:{tmp_path / 'none'}"])
    assert missing.exit_code == 2 and "fewstep prepare" in missing.output


# ---------------------------------------------------------------------------------------------------
# CUDA: pinned, prefetched batches; latents drawn on the device; the fp16 decoder
# ---------------------------------------------------------------------------------------------------
def memory_latents(n: int, shape=(4, 4, 4)):
    from fewstep.data import LatentDataset, LatentFormat

    fmt = LatentFormat(vae="tiny", resolution=8 * shape[1], latent_shape=shape, raw_mean=(0.5, 1.5, 2.5, 3.5),
                       raw_std=(1.0, 2.0, 1.5, 0.5))
    mean, std = random_posterior(n, shape)
    return LatentDataset.from_tensors(mean, std, torch.arange(n) % 3, fmt, num_classes=3), mean, std


@pytest.mark.gpu
def test_cuda_stream_draws_latents_on_the_device():
    from fewstep.data import noise_seed

    ds, mean, std = memory_latents(20)
    stream = BatchStream(ds, 8, seed=1, device="cuda")
    assert stream.pin_memory and stream.prefetch == 2   # the CUDA defaults
    got = []
    for _ in range(5):
        position, idx = stream.position, stream.indices.batch_at(stream.position)
        x, y = next(stream)
        assert x.is_cuda and y.is_cuda and torch.equal(y.cpu(), ds.labels[idx])
        eps = torch.randn((8, 4, 4, 4), device="cuda", generator=torch.Generator("cuda").manual_seed(noise_seed(1, 0, position)))
        ref = ds.latent_format.normalize(mean[idx].cuda() + std[idx].cuda() * eps)
        torch.testing.assert_close(x, ref, rtol=1e-6, atol=1e-6)
        got.append(x)
    resumed = BatchStream(ds, 8, seed=1, device="cuda", start_position=24, prefetch=0)
    assert all(torch.equal(next(resumed)[0], g) for g in got[3:])


@pytest.mark.gpu
def test_cuda_fp16_decoder_matches_the_cpu_one():
    from fewstep.data.vae import LatentDecoder
    from latents_helpers import tiny_vae

    ds, _, _ = memory_latents(6)
    x = torch.stack([ds[i][0] for i in range(6)])
    cpu = LatentDecoder(ds.latent_format, vae=tiny_vae(), device="cpu")(x)
    gpu = LatentDecoder(ds.latent_format, vae=tiny_vae(), device="cuda")
    assert gpu.dtype == torch.float16
    out = gpu(x)
    assert out.shape == cpu.shape == (6, 3, 32, 32) and out.dtype == torch.uint8 and out.device.type == "cpu"
    diff = (out.int() - cpu.int()).abs()
    assert diff.max() <= 3 and (diff == 0).float().mean() > 0.8


@pytest.mark.gpu
def test_cuda_bench_pins_and_reports():
    from fewstep.bench.data import bench_data

    ds, _, _ = memory_latents(2048, (4, 32, 32))
    report = bench_data(ds, batch=256, steps=10, warmup=2, prefetch=[0, 2], step_ms=20, device="cuda")
    assert report["device"].startswith("cuda") and all(r["pin_memory"] for r in report["rows"])
    assert all(r["images_per_s"] > 0 and r["wait_ms"] >= 0 for r in report["rows"])
