"""What users see when things go wrong (docs/reliability.md): one line saying what and what to do, never a
traceback; checks before compute (``--dry-run`` included); GPU recipes on a CPU refused before they
allocate; the exact command that resumes a stopped run; progress that shows where people run training."""
from __future__ import annotations

import io
import itertools
import logging
import json
import os
import shlex
import signal

import numpy as np
import pytest
import torch
from rich.console import Console
from test_data import hf_cache, write_folder  # noqa: F401 (fixture)
from typer.testing import CliRunner

from fewstep.cli import app
from fewstep.config import ConfigError
from fewstep.objectives.fm import FlowMatching
from fewstep.train import resources
from fewstep.train.status import StatusLog

GIB = 2**30
TINY = {"train.batch": 16, "train.status_kimg": 0.032, "sample.num_images": 4, "sample.nfe": "(1,)",
        "backbone.depth": 2, "backbone.hidden_size": 32, "backbone.num_heads": 2, "train.cpu_threads": 1}


def run(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def one_error(res) -> str:
    """The result's single ``error:`` line (and no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, Exception) or isinstance(
        res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture
def tiny_run(fashion_dir, tmp_path):
    """A trained tiny run directory (2 steps)."""
    out = tmp_path / "run"
    res = run("train", "--recipe", "smoke", "--kimg", "0.032", "--out", out, "--no-progress",
              *sets({**TINY, "data.root": fashion_dir}))
    assert res.exit_code == 0, res.output
    return out


# ---------------------------------------------------------------------------------------------------
# Checked before compute, --dry-run included
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--set", "train.ema_betas={'ema':1.0}"], "train.ema_betas['ema'] must be a decay in [0, 1), got 1.0"),
    (["--set", "sample.nfe=(0,)"], "sample.nfe must be ≥ 1 jumps each, got [0]"),
    (["--set", "train.lr=0"], "train.lr must be a finite number > 0, got 0.0"),
    (["--set", "train.lr=-1e-4"], "train.lr must be a finite number > 0"),
    (["--data", "fashion-mnst"], "did you mean 'fashion-mnist'"),
    (["--batch", "7", "--set", "train.batch_per_gpu=2"], "train.batch=7 must be divisible by devices (1) × train.batch_per_gpu (2)"),
    (["--set", "data.root=/no/such/dir"], "data.root='/no/such/dir' does not exist"),
], ids=["ema-decay", "nfe", "lr-zero", "lr-negative", "dataset-name", "batch-layout", "data-root"])
def test_dry_run_checks_what_training_checks(args, message):
    error = one_error(run("train", "--recipe", "smoke", *args, "--dry-run"))
    assert message in error


# ---------------------------------------------------------------------------------------------------
# GPU recipes on a CPU
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def machine_with(monkeypatch):
    """Pretend the machine has ``GiB`` of free memory."""
    def set_(gib: float):
        monkeypatch.setattr(resources, "available_memory", lambda: int(gib * GIB))
    return set_


def test_tvm_on_dit_xl_on_a_cpu_says_what_it_needs_before_allocating(machine_with, tmp_path, monkeypatch):
    machine_with(22)
    monkeypatch.setattr("fewstep.train.loop.build_objective", lambda *a, **k: pytest.fail("allocated the model"))
    error = one_error(run("train", "--objective", "tvm", "--backbone", "dit-xl", "--out", tmp_path / "x",
                          "--no-progress"))
    assert "needs at least" in error and "GiB of memory on the CPU" in error
    assert "2.03 B parameters (677 M trained)" in error and "of activations per image × 64 images" in error
    assert "22 GiB are available" in error and "on a CPU use --recipe smoke" in error
    assert not (tmp_path / "x").exists()                        # nothing left behind
    dry = CliRunner().invoke(app, ["train", "--objective", "tvm", "--backbone", "dit-xl", "--dry-run"])
    assert dry.exit_code == 0 and json.loads(dry.stdout)["backbone"]["depth"] == 28   # a GPU run checked on a laptop
    assert "warning: on this machine this run needs at least" in " ".join(dry.stderr.split())


@pytest.mark.slow   # two DiT-B fake forwards per member: about 20 s on 2 cores
def test_fashion_mnist_recipes_on_a_cpu_are_refused(machine_with, tmp_path, monkeypatch):
    machine_with(22)
    monkeypatch.setattr("fewstep.train.loop.build_objective", lambda *a, **k: pytest.fail("allocated the model"))
    error = one_error(run("train", "--recipe", "fashion-mnist", "--backbone", "dit-b", "--out", tmp_path / "x"))
    assert "needs at least" in error and "recipe 'fashion-mnist' with dit-b on a GPU" in error
    monkeypatch.setattr("fewstep.train.train", lambda *a, **k: pytest.fail("started a member"))
    error = one_error(run("sweep", "--recipe", "fashion-mnist-sweep", "--objectives", "fm,tvm", "--out", tmp_path / "s"))
    assert error.startswith("error: member fm: this run needs at least") and "--recipe smoke" in error


@pytest.mark.parametrize("objective", ["fm", "tvm", "meanflow", "scm", "ect"])
def test_every_objectives_step_is_measured(fashion_dir, objective):
    from fewstep.build import build_config
    from fewstep.data import load_dataset

    from fewstep.build import resolve

    cfg = resolve(build_config("smoke", objective, None, None, None, 4, [f"data.root={fashion_dir}"]))
    est = resources.estimate_memory(cfg, load_dataset(cfg.data), 4, measure_above=0)
    assert est.activation_bytes_per_sample > 0 and est.whole_step == (objective != "ect")   # ECT: a lower bound


def test_the_memory_estimate_counts_what_autograd_really_keeps(fashion_dir):
    """The fake forward's count equals the same count over a real forward with the same draws, and the
    refusal threshold follows from the estimate."""
    from fewstep.build import build_objective, resolve
    from fewstep.build import build_config
    from fewstep.data import load_dataset

    cfg = resolve(build_config("smoke", "tvm", None, None, None, 2, [f"data.root={fashion_dir}"]))
    dataset = load_dataset(cfg.data)
    with torch.device("meta"):
        meta = build_objective(cfg, dataset.spec)
    (fake,), whole_step = resources.kept_bytes(meta, dataset, (2,))
    objective = build_objective(cfg, dataset.spec)
    seen = {p.untyped_storage()._cdata for p in objective.parameters()}
    seen |= {b.untyped_storage()._cdata for b in objective.buffers()}
    kept, alive = [], []

    def pack(t):
        if t.untyped_storage()._cdata not in seen:
            seen.add(t.untyped_storage()._cdata)
            alive.append(t)
            kept.append(t.untyped_storage().nbytes())
        return t

    x = dataset[0][0].expand(2, *dataset[0][0].shape).contiguous()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(x, dataset[0][1].expand(2).contiguous(), torch.Generator().manual_seed(0), 0)
    assert whole_step and fake == sum(kept) > 0
    est = resources.estimate_memory(cfg, dataset, 4, measure_above=0)
    n = sum(p.numel() for p in objective.parameters())
    trained = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    assert (est.parameters, est.trainable, est.state_bytes) == (n, trained, 4 * (n + 3 * trained))
    need = est.total()
    assert need == est.state_bytes + est.fixed_activation_bytes + 4 * est.activation_bytes_per_sample
    with pytest.raises(ConfigError, match=r"needs at least .* train.batch_per_gpu=\d"):
        resources.check_memory(cfg, dataset, 4, torch.device("cpu"), available=need - 1, measure_above=0)
    assert resources.check_memory(cfg, dataset, 4, torch.device("cpu"), available=10 * need, measure_above=0)
    assert resources.check_memory(cfg, dataset, 4, torch.device("cuda"), available=1) is None   # GPUs: not checked


# ---------------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------------
def test_cpu_threads_setting_auto_choice_and_resume(fashion_dir, tmp_path, monkeypatch):
    from test_train import tiny

    from fewstep.train import train

    seen, original = [], FlowMatching.forward
    monkeypatch.setattr(FlowMatching, "forward", lambda self, *a: seen.append(torch.get_num_threads()) or
                        original(self, *a))
    before = torch.get_num_threads()
    train(tiny(fashion_dir, **{"train.cpu_threads": 2, "train.total_kimg": 0.032}), tmp_path / "a",
          show_progress=False)
    assert set(seen) == {2} and torch.get_num_threads() == before       # set for the run, then restored
    monkeypatch.setattr(resources.os, "getloadavg", lambda: (2.0, 2.0, 2.0))   # both cores busy elsewhere
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resources.auto_threads() == 1
    monkeypatch.setattr(resources.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert resources.auto_threads() == 2 and resources.auto_threads(processes_here=2) == 1
    seen.clear()
    train(tiny(fashion_dir, **{"train.cpu_threads": None, "train.total_kimg": 0.032}), tmp_path / "b",
          show_progress=False)
    assert set(seen) == {2}                                              # auto on an idle 2-core machine
    monkeypatch.setattr(resources.os, "getloadavg", lambda: (2.0, 2.0, 2.0))
    seen.clear()
    train(tiny(fashion_dir, **{"train.cpu_threads": None}), tmp_path / "b", show_progress=False)
    assert set(seen) == {2}                                              # a resume keeps the run's count
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with resources.cpu_threads(None, torch.device("cpu")) as chosen:
        assert chosen is None                                            # the user's OMP_NUM_THREADS wins


# ---------------------------------------------------------------------------------------------------
# Resume hints, Ctrl-C, progress
# ---------------------------------------------------------------------------------------------------
def test_ctrl_c_without_out_prints_the_command_that_resumes(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original, calls = FlowMatching.forward, itertools.count(1)

    def forward(self, *args):
        if next(calls) == 3:
            signal.raise_signal(signal.SIGINT)   # Ctrl-C during step 3
        return original(self, *args)

    monkeypatch.setattr(FlowMatching, "forward", forward)
    args = ["train", "--recipe", "smoke", "--kimg", "0.064", "--no-progress", *sets({**TINY, "data.root": fashion_dir})]
    res = run(*args)
    assert res.exit_code == 130, res.output
    assert "received SIGINT: stopping after this step" in res.output            # acknowledged at once
    command = res.output.split("To resume, run: ")[1].strip().replace("\n", "")
    assert command.startswith("fewstep train --recipe smoke --kimg 0.064 --set") and "--out runs/00000-smoke-fm-" in command
    monkeypatch.setattr(FlowMatching, "forward", original)
    again = run(*shlex.split(command)[1:])                                       # exactly that command resumes
    assert again.exit_code == 0 and "resumed from checkpoint-00000003" in again.output
    assert not (tmp_path / "runs" / "00001-smoke-fm-dit-debug").exists()


def test_status_lines_go_out_as_they_happen_when_the_output_is_a_file(tmp_path):
    from rich.logging import RichHandler

    from fewstep.logs import _install, setup_plain_logging

    out = io.StringIO()
    setup_plain_logging(stream=out)                                              # `> log 2>&1`, sbatch, tee
    try:
        status = StatusLog(tmp_path, total_kimg=1.0, start_kimg=0.0)
        assert status.progress is None                                           # no live bar into a file
        status.report({"step": 5, "kimg": 0.08, "loss": 0.5, "img_per_s": 100.0})
        assert "step       5  kimg    0.080/1  loss 0.5000  100 img/s" in out.getvalue()   # at once
        _install(RichHandler(console=Console(file=io.StringIO(), force_terminal=True, width=200)), 20)
        terminal = StatusLog(tmp_path, total_kimg=1.0, start_kimg=0.0)
        terminal.advance(0.25)                                                   # every step moves bar and ETA
        assert terminal.progress.tasks[0].completed == 0.25
        terminal.close()
    finally:
        logging.getLogger("fewstep").handlers.clear()


# ---------------------------------------------------------------------------------------------------
# Library errors as one line
# ---------------------------------------------------------------------------------------------------
def test_output_paths_that_cannot_be_written(tiny_run, tmp_path):
    (tmp_path / "file").write_text("")
    error = one_error(run("sample", "--run", tiny_run, "--seeds", "0-1", "--out", tmp_path / "file" / "grid.png"))
    assert f"Not a directory ({tmp_path / 'file'})" in error
    error = one_error(run("sample", "--run", tiny_run, "--seeds", "0-1", "--out", tmp_path / "g.png",
                          "--save-tensor", tmp_path / "file" / "x.safetensors"))
    assert "Not a directory" in error


def test_an_output_path_that_is_a_directory(tiny_run, tmp_path):
    (tmp_path / "dir.png").mkdir()
    error = one_error(run("sample", "--run", tiny_run, "--seeds", "0-1", "--out", tmp_path / "dir.png"))
    assert "Is a directory" in error and "dir.png" in error


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file, so another user's unreadable run cannot be "
                                              "made here")
def test_another_users_unreadable_run(tiny_run, tmp_path):
    (tiny_run / "checkpoint-00000002" / "objective.safetensors").chmod(0o000)
    error = one_error(run("sample", "--run", tiny_run, "--out", tmp_path / "g.png"))
    assert "holds no valid checkpoint" in error and "cannot read" in error and "Permission denied" in error


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "--device cuda: this torch build"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--batch", "0"], "--batch must be ≥ 1 images per forward, got 0"),
    (["--nfe", "1,x"], "--nfe takes a comma list of jump counts ≥ 1"),
], ids=["cuda", "unknown", "batch", "nfe"])
def test_bad_sample_options(tiny_run, tmp_path, args, message):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert message in one_error(run("sample", "--run", tiny_run, "--out", tmp_path / "g.png", *args))


def test_a_garbage_reference_and_a_manifest_missing_a_field(tiny_run, tmp_path):
    (tmp_path / "ref.npz").write_text("garbage")
    error = one_error(run("eval", "--run", tiny_run, "--ref", tmp_path / "ref.npz", "--num", "4",
                          "--extractor", "random-projection", "--no-progress"))
    assert "ref.npz cannot be read (it is not an .npz archive)" in error
    manifest = tiny_run / "checkpoint-00000002" / "manifest.json"
    body = json.loads(manifest.read_text())
    del body["config"]
    manifest.write_text(json.dumps(body))
    error = one_error(run("sample", "--run", tiny_run, "--out", tmp_path / "g.png"))
    assert "checkpoint-00000002 has no 'config' in its manifest.json" in error


def test_a_broken_image_in_an_image_folder_is_named(hf_cache, tmp_path):  # noqa: F811
    folder = write_folder(hf_cache / "imgs", {"cat": [(8, 8)] * 3})
    (folder / "cat" / "1.png").write_bytes(b"not a png")
    error = one_error(run("train", "--data", f"imagefolder:{folder}", "--dry-run"))
    assert "cat/1.png" in error and "is not a readable image" in error and "remove or replace" in error


def test_prepare_without_a_network_says_it_is_the_network(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    error = one_error(run("prepare", "--data", "fashion-mnist", "--out", tmp_path / "lat", "--limit", "2",
                          "--no-progress"))
    assert "no network connection to http://127.0.0.1:9" in error and "It is the network" in error


def test_files_are_written_with_the_users_umask(tiny_run, tmp_path):
    old = os.umask(0o002)
    try:
        assert run("sample", "--run", tiny_run, "--seeds", "0-1", "--out", tmp_path / "g.png").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "g.png").stat().st_mode & 0o777 == 0o664          # not mkstemp's 0o600
    assert (tiny_run / "samples" / "final.png").stat().st_mode & 0o044 == 0o044   # colleagues can read a run
    assert (tiny_run / "checkpoint-00000002" / "objective.safetensors").stat().st_mode & 0o044 == 0o044


def test_markup_in_messages_is_printed_as_text(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    error = one_error(run("train", "--data", "imagefolder:/tmp", "--dry-run"))
    assert "pip install 'fewstep[hf]'" in error


def test_garbage_numbers_in_np_load_are_refused(tmp_path):
    from fewstep.evaluate_images import load_stats

    np.save(tmp_path / "one.npy", np.ones(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one.npz cannot be read \(it is not an .npz archive\)"):
        load_stats(tmp_path / "one.npz")
