"""Dataset layer: IDX parsing, Fashion-MNIST search, the batch stream, HF image folders, setup script."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.config import ConfigError, DataConfig
from fewstep.contracts import DataSpec
from fewstep.data import (BatchStream, DataError, DataNotFoundError, FashionMNIST, InMemoryImageDataset,
                          load_dataset, read_idx)
from fewstep.data import fashion_mnist as fm
from fewstep.registry import RegistryError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# Helpers: small IDX files
# ---------------------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(directory: Path, split: str, n: int, *, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array, magic in zip(fm.FILES[split], (images, labels), (fm.IMAGES_MAGIC, fm.LABELS_MAGIC)):
        data = idx_bytes(array, magic)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return images, labels


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch, tmp_path):
    """Tests see only the files they write: no $FEWSTEP_DATA, no Debian directory."""
    monkeypatch.delenv("FEWSTEP_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system-fashion-mnist")


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_items_padding_and_batches(tmp_path, gz):
    images, labels = write_split(tmp_path, "train", 12, gz=gz)
    ds = load_dataset(DataConfig(root=str(tmp_path)))
    assert isinstance(ds, FashionMNIST)
    assert ds.spec == DataSpec("fashion-mnist", 1, 32, 10, 12, "pixels")
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == labels[3]
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(images[3]).float() / 127.5 - 1)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[0][border] == -1).all()
    xb, yb = ds.get_batch(torch.tensor([3, 0, 7]))
    assert xb.shape == (3, 1, 32, 32) and yb.dtype == torch.int64
    assert torch.equal(xb[0], x) and torch.equal(yb, torch.from_numpy(labels[[3, 0, 7]]).long())


def test_fashion_mnist_test_split_and_resolution(tmp_path):
    write_split(tmp_path, "test", 5, gz=True)
    assert load_dataset(DataConfig(root=str(tmp_path), split="test")).spec.num_items == 5
    assert FashionMNIST(tmp_path, "test", resolution=28).spec.resolution == 28
    with pytest.raises(DataError, match="resolution"):
        FashionMNIST(tmp_path, "test", resolution=16)
    with pytest.raises(DataError, match="'train' and 'test'"):
        FashionMNIST(tmp_path, "val")


def test_real_fashion_mnist(monkeypatch):
    real = Path("/usr/share/datasets/fashion-mnist")
    if not (real / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(fm, "SYSTEM_DIR", real)
    for split, n in (("train", 60_000), ("test", 10_000)):
        ds = load_dataset(DataConfig(split=split))
        assert ds.spec.num_items == len(ds) == n and ds.files[0].parent == real
        x, y = ds.get_batch(torch.arange(0, n, 97))
        assert x.shape[1:] == (1, 32, 32) and ds[0][0].shape == (1, 32, 32)
        assert x.min() == -1 and x.max() == 1
        assert (x[..., :2, :] == -1).all() and (x[..., -2:, :] == -1).all()
        assert (x[..., :2] == -1).all() and (x[..., -2:] == -1).all()
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert torch.bincount(ds.labels).tolist() == [n // 10] * 10


def test_idx_errors_name_the_file(tmp_path):
    write_split(tmp_path, "train", 4, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic number 2049, expected 2051"):
        FashionMNIST(tmp_path)
    images.write_bytes(good[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated"):
        FashionMNIST(tmp_path)
    images.write_bytes(good[:6])
    with pytest.raises(DataError, match="truncated"):
        read_idx(images, fm.IMAGES_MAGIC)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(gz, fm.IMAGES_MAGIC)


def test_label_count_mismatch_and_range(tmp_path):
    write_split(tmp_path, "train", 4, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8), fm.LABELS_MAGIC))
    with pytest.raises(DataError, match=r"has 4 images but .*train-labels-idx1-ubyte has 3 labels"):
        FashionMNIST(tmp_path)
    labels.write_bytes(idx_bytes(np.full(4, 10, np.uint8), fm.LABELS_MAGIC))
    with pytest.raises(DataError, match="label 10"):
        FashionMNIST(tmp_path)


def test_missing_files_list_searched_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "env"))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset(DataConfig())
    msg = str(info.value)
    for d in ("env", os.path.join("env", "fashion-mnist"), "system-fashion-mnist"):
        assert str(tmp_path / d) in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "data.root=DIR" in msg
    assert "FEWSTEP_DATA" in msg and "zalandoresearch/fashion-mnist" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_search_order(tmp_path, monkeypatch):
    write_split(fm.SYSTEM_DIR, "train", 3, gz=True)
    assert len(FashionMNIST()) == 3
    write_split(tmp_path / "env" / "fashion-mnist", "train", 4, gz=True)
    monkeypatch.setenv("FEWSTEP_DATA", str(tmp_path / "env"))
    assert len(FashionMNIST()) == 4                      # $FEWSTEP_DATA/fashion-mnist beats the system dir
    write_split(tmp_path / "env", "train", 5, gz=False)
    assert len(FashionMNIST()) == 5                      # $FEWSTEP_DATA itself beats its sub-directory
    write_split(tmp_path / "root", "train", 6, gz=True)
    assert len(FashionMNIST(root=tmp_path / "root")) == 6   # data.root beats $FEWSTEP_DATA
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="Searched:") as info:   # a root is the only place searched
        FashionMNIST(root=tmp_path / "empty")
    assert str(tmp_path / "env") not in str(info.value)


def test_an_explicit_root_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    write_split(fm.SYSTEM_DIR, "train", 3, gz=True)   # a copy it must not fall back to (and record the wrong root)
    with pytest.raises(ConfigError, match=r"data.root='.*nowhere' does not exist"):
        load_dataset(DataConfig(root=str(tmp_path / "nowhere")))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(RegistryError, match="did you mean 'fashion-mnist'"):
        load_dataset(DataConfig(name="fashion-mnst"))
    with pytest.raises(RegistryError, match="did you mean 'imagefolder'"):
        load_dataset(DataConfig(name="imagefolde:/tmp"))
    with pytest.raises(DataError, match="imagefolder:PATH"):
        load_dataset(DataConfig(name="imagefolder"))


# ---------------------------------------------------------------------------------------------------
# BatchStream
# ---------------------------------------------------------------------------------------------------
def toy(n: int = 10) -> InMemoryImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return InMemoryImageDataset(images, torch.arange(n), name="toy", num_classes=n)


class NoBatch(torch.utils.data.Dataset):
    """A dataset without get_batch: exercises the DataLoader path."""

    def __init__(self, n: int = 10):
        self.inner = toy(n)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def take(stream: BatchStream, k: int) -> list[torch.Tensor]:
    return [next(stream)[1] for _ in range(k)]


def test_stream_is_deterministic_and_covers_each_epoch():
    a, b = take(BatchStream(toy(), 5, seed=1), 8), take(BatchStream(toy(), 5, seed=1), 8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, take(BatchStream(toy(), 5, seed=2), 8)))
    for epoch in range(4):
        assert sorted(torch.cat(a[2 * epoch: 2 * epoch + 2]).tolist()) == list(range(10))
    assert not torch.equal(torch.cat(a[:2]), torch.cat(a[2:4]))   # a fresh permutation per epoch
    x, y = next(BatchStream(toy(), 5, seed=1))
    assert x.shape == (5, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0, 0, 0], y.float() / 127.5 - 1)


def test_stream_resumes_exactly_across_epochs():
    full = BatchStream(toy(), 3, seed=7)
    expected = take(full, 12)                       # batches of 3 over 10 items: crosses epoch boundaries
    first = BatchStream(toy(), 3, seed=7)
    got = take(first, 5)
    assert first.position == 15
    got += take(BatchStream(toy(), 3, seed=7, start_position=first.position), 7)
    assert all(torch.equal(u, v) for u, v in zip(got, expected))
    with pytest.raises(ValueError, match="multiple"):
        BatchStream(toy(), 3, seed=7, start_position=4)


def test_ranks_share_each_global_batch():
    ranks = [BatchStream(toy(12), 2, seed=3, rank=r, world_size=3) for r in range(3)]
    single = BatchStream(toy(12), 6, seed=3)
    for _ in range(5):
        parts = [next(s)[1] for s in ranks]
        whole = next(single)[1]
        assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist())   # exactly once, no overlap
        assert torch.equal(torch.stack(parts, 1).flatten(), whole)           # strided share
    assert all(s.position == 30 for s in ranks) and single.position == 30


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_matches_get_batch(workers):
    fast, slow = BatchStream(toy(), 4, seed=5), BatchStream(NoBatch(), 4, seed=5, num_workers=workers)
    for _ in range(6):
        (xf, yf), (xs, ys) = next(fast), next(slow)
        assert torch.equal(xf, xs) and torch.equal(yf, ys)
    assert slow.position == 24


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets: image folders, hub, the missing extra
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    hf = pytest.importorskip("datasets", reason="HF datasets not installed (pip install 'fewstep[hf]')")
    pytest.importorskip("PIL", reason="Pillow not installed")
    monkeypatch.setattr(hf.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path


def write_folder(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, whs in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(whs):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_native_size(hf_cache):
    from PIL import Image

    folder = write_folder(hf_cache / "imgs", {"cat": [(8, 8)] * 3, "dog": [(8, 8)] * 2})
    ds = load_dataset(DataConfig(name=f"imagefolder:{folder}"))
    assert ds.spec == DataSpec(f"imagefolder:{folder}", 3, 8, 2, 5, "pixels")
    assert ds.class_names == ["cat", "dog"]
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    assert sorted(int(y) for y in ys) == [0, 0, 0, 1, 1] and ys[0].dtype == torch.int64
    assert all(x.shape == (3, 8, 8) and x.dtype == torch.float32 for x in xs)
    png = torch.from_numpy(np.array(Image.open(folder / "cat" / "0.png"))).permute(2, 0, 1)
    assert any(torch.equal(x, png.float() / 127.5 - 1) for x in xs)
    x, y = next(BatchStream(ds, 4, seed=0))
    assert x.shape == (4, 3, 8, 8) and y.shape == (4,) and -1 <= x.min() and x.max() <= 1


def test_imagefolder_resolution_grayscale_and_mixed_sizes(hf_cache):
    folder = write_folder(hf_cache / "mixed", {"a": [(16, 8), (9, 12)], "b": [(8, 8)]}, mode="L")
    with pytest.raises(DataError, match=r"differ in size: item \d is \d+×\d+, item \d is \d+×\d+.*resolution"):
        load_dataset(DataConfig(name=f"imagefolder:{folder}"))
    ds = load_dataset(DataConfig(name=f"imagefolder:{folder}", resolution=4))
    assert ds.spec.resolution == 4 and ds.spec.channels == 3 and ds.spec.num_classes == 2
    assert all(ds[i][0].shape == (3, 4, 4) for i in range(3))
    with pytest.raises(DataNotFoundError, match="not a directory"):
        load_dataset(DataConfig(name=f"imagefolder:{hf_cache / 'nope'}"))


def test_imagefolder_without_classes_is_unconditional(hf_cache):
    from PIL import Image

    (hf_cache / "flat").mkdir()
    for i in range(3):
        Image.new("RGB", (6, 6), (i, 0, 255)).save(hf_cache / "flat" / f"{i}.png")
    ds = load_dataset(DataConfig(name=f"imagefolder:{hf_cache / 'flat'}"))
    assert ds.spec.num_classes == 0 and int(ds[0][1]) == 0
    assert ds[0][0][2].eq(1).all()


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="need a network") as info:
        load_dataset(DataConfig(name="hub:uoft-cs/cifar10"))
    assert time.perf_counter() - start < 2.0
    assert "imagefolder:PATH" in str(info.value) and "fashion-mnist" in str(info.value)


def test_without_hf_datasets(tmp_path, monkeypatch):
    """Fashion-MNIST needs neither datasets nor PIL; the HF paths name the extra to install."""
    write_split(tmp_path, "train", 3, gz=True)
    code = ("import sys; sys.modules['datasets'] = None; sys.modules['PIL'] = None\n"
            "from fewstep.config import DataConfig\nfrom fewstep.data import load_dataset, DataError\n"
            f"print(len(load_dataset(DataConfig(root={str(tmp_path)!r}))))\n"
            f"try:\n    load_dataset(DataConfig(name='imagefolder:{tmp_path}'))\n"
            "except DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert out.startswith("3\n") and "pip install 'fewstep[hf]'" in out


# ---------------------------------------------------------------------------------------------------
# scripts/setup-data.sh
# ---------------------------------------------------------------------------------------------------
def test_setup_script_finds_files(tmp_path):
    write_split(tmp_path / "fashion-mnist", "train", 2, gz=True)
    write_split(tmp_path / "fashion-mnist", "test", 2, gz=False)
    run = subprocess.run(["bash", str(REPO / "scripts" / "setup-data.sh")], capture_output=True, text=True,
                         env={**os.environ, "FEWSTEP_DATA": str(tmp_path)})
    assert run.returncode == 0 and run.stdout == f"Fashion-MNIST: found in {tmp_path / 'fashion-mnist'}\n"


def test_setup_script_explains_when_it_cannot_install(tmp_path):
    """No files and no apt-get on PATH: exit 1 with the searched directories and instructions."""
    script = (REPO / "scripts" / "setup-data.sh").read_text()
    fake = tmp_path / "setup-data.sh"
    fake.write_text(script.replace("SYSTEM_DIR=/usr/share/datasets/fashion-mnist",
                                   f"SYSTEM_DIR={tmp_path / 'none'}"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("cat", "id", "mktemp", "rm"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    run = subprocess.run([shutil.which("bash"), str(fake), str(tmp_path / "mine")], capture_output=True,
                         text=True, env={"PATH": str(bin_dir), "FEWSTEP_DATA": str(tmp_path / "env")})
    assert run.returncode == 1 and run.stdout == ""
    for d in ("mine", "env", "none"):
        assert str(tmp_path / d) in run.stderr
    assert "sudo apt-get install dataset-fashion-mnist" in run.stderr and "FEWSTEP_DATA" in run.stderr
