"""Reliability (docs/reliability.md): each test injects one fault and checks what survives.

Resume from the newest complete checkpoint, non-finite steps, disk full and unwritable directories
during saves, pruning, and bad input refused before any compute. Kills and signals (separate
processes) are in test_faults.py. All runs are the tiny CPU config of test_train.py: 8 steps of 16 images.
"""
from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from test_train import read_log, tiny

from fewstep import checkpoints
from fewstep.checkpoints import (CheckpointError, CheckpointWriteError, latest_checkpoint, list_checkpoints, prune_checkpoints,
                                 save_checkpoint, verify_checkpoint)
from fewstep.config import ConfigError
from fewstep.data.base import DataError, InMemoryImageDataset
from fewstep.objectives.fm import FlowMatching
from fewstep.registry import RegistryError, datasets
from fewstep.train import NonFiniteLossError, train
from fewstep.train.guards import RunLock

EVERY_2 = {"train.checkpoint_kimg": 0.032, "train.keep_checkpoints": 0}   # a checkpoint every 2 steps, all kept

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-exact comparisons across processes and resumes need one CPU thread everywhere: a matmul's
    rounding depends on how many threads split it (and forked children run single-threaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def snapshot(ckpt_dir) -> dict[str, dict[str, torch.Tensor] | dict]:
    """Everything a checkpoint holds: weights + EMA, optimizer tensors, RNG states, position and counters."""
    ckpt = verify_checkpoint(ckpt_dir)
    keys = ("step", "nimg", "data_position", "skipped_steps", "bad_streak", "optimizer")
    return {"objective": ckpt.tensors("objective.safetensors"), "optimizer": ckpt.tensors("optimizer.safetensors"),
            "rng": ckpt.tensors("rng-rank0.safetensors"), "manifest": {k: ckpt.manifest[k] for k in keys}}


def assert_same(a: dict, b: dict, parts=("objective", "optimizer", "rng", "manifest")) -> None:
    for part in parts:
        if part == "manifest":
            assert a[part] == b[part]
            continue
        assert a[part].keys() == b[part].keys(), part
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not diff, f"{part} differs: {diff[:5]}"


@pytest.fixture(scope="module")
def straight(fashion_dir, tmp_path_factory):
    """The reference: 8 steps without interruption, a checkpoint every 2 steps (step → snapshot)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    return {verify_checkpoint(p).step: snapshot(p) for p in list_checkpoints(run)}


def test_resume_picks_the_newest_complete_checkpoint(fashion_dir, tmp_path, straight):
    run = tmp_path / "run"
    train(tiny(fashion_dir, **EVERY_2, **{"train.total_kimg": 0.096}), run, show_progress=False)   # steps 2, 4, 6
    six = run / "checkpoint-00000006" / "optimizer.safetensors"
    six.write_bytes(six.read_bytes()[:-7])                        # truncated
    (run / "checkpoint-00000007").mkdir()                         # a directory without a manifest
    result = train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    events = [r for r in read_log(run) if r.get("event") == "checkpoint_skipped"]
    assert "checkpoint-00000007 is incomplete" in events[0]["message"]
    assert "checkpoint-00000006/optimizer.safetensors is truncated" in events[1]["message"]
    assert result.step == 8
    assert_same(snapshot(result.checkpoint), straight[8])        # resumed from step 4, replayed 5–8 exactly
    assert_same(snapshot(run / "checkpoint-00000006"), straight[6])   # the broken one was rewritten


# ---------------------------------------------------------------------------------------------------
# Non-finite loss and gradients
# ---------------------------------------------------------------------------------------------------
def poison(monkeypatch, bad_calls, kind="loss"):
    """Make FlowMatching.forward calls number ``bad_calls`` (1-based) go bad.

    ``loss``: per-sample losses of samples with t > 0.5 become NaN (loss and loss_fm too) and the output
    carries ``t``; ``grad``: the loss stays finite but its gradient is NaN. Returns the t of each call.
    """
    calls, seen_t = {"n": 0}, []
    original = FlowMatching.forward

    class NanGrad(torch.autograd.Function):
        forward = staticmethod(lambda ctx, v: v.clone())
        backward = staticmethod(lambda ctx, g: g * float("nan"))

    def forward(self, x, y, generator=None, nimg=0):
        hook = self.backbone.register_forward_pre_hook(lambda m, args: seen_t.append(args[1].detach().clone()))
        try:
            out = original(self, x, y, generator, nimg)
        finally:
            hook.remove()
        calls["n"] += 1
        if calls["n"] in bad_calls and kind == "loss":
            t = seen_t[-1]
            out.per_sample = torch.where(t > 0.5, float("nan"), out.per_sample)
            out.loss = out.loss + out.per_sample.mean()
            out.logs["loss_fm"] = out.per_sample.mean()
            out.t = t
        elif calls["n"] in bad_calls:
            out.loss = NanGrad.apply(out.loss)
        return out

    monkeypatch.setattr(FlowMatching, "forward", forward)
    return seen_t


def test_a_nonfinite_loss_skips_the_step_and_logs_terms_and_times(fashion_dir, tmp_path, monkeypatch, straight):
    seen_t = poison(monkeypatch, {5})
    result = train(tiny(fashion_dir, **EVERY_2, **{"train.total_kimg": 0.080}), tmp_path / "r", show_progress=False)
    event = next(r for r in read_log(tmp_path / "r") if r.get("event") == "nonfinite")
    t = seen_t[4]
    assert event["step"] == 5 and event["terms"] == ["loss", "loss_fm"]   # the NaN never reached a gradient
    assert event["bad_samples"] == int((t > 0.5).sum()) > 0
    assert event["t_range"] == pytest.approx([float(t[t > 0.5].min()), float(t[t > 0.5].max())])
    assert result.step == 5 and result.skipped_steps == 1
    # Nothing of step 5 was applied: weights, EMA and optimizer are exactly those after step 4.
    after = snapshot(result.checkpoint)
    assert_same(after, straight[4], parts=("objective", "optimizer"))
    assert after["manifest"]["skipped_steps"] == 1 and after["manifest"]["data_position"] == 80


def test_nonfinite_gradients_with_a_finite_loss_skip_the_step(fashion_dir, tmp_path, monkeypatch, straight):
    poison(monkeypatch, {3}, kind="grad")
    run = tmp_path / "g"
    result = train(tiny(fashion_dir, **{"train.total_kimg": 0.064, "train.checkpoint_kimg": 0.016,
                                        "train.keep_checkpoints": 0}), run, show_progress=False)
    events = [r for r in read_log(run) if r.get("event") == "nonfinite"]
    assert len(events) == 1 and events[0]["step"] == 3
    assert events[0]["terms"] == ["grad_norm"] and events[0]["bad_samples"] == 0 and events[0]["grad_norm"] == "nan"
    # Step 3 changed nothing (no checkpoint is written inside a bad streak; step 4's holds it), and its NaN
    # gradients were dropped, not carried into step 4, which trained normally.
    assert [p.name[-1] for p in list_checkpoints(run)] == ["1", "2", "4"] and result.skipped_steps == 1
    four = snapshot(result.checkpoint)
    assert float(four["optimizer"]["state.0.step"]) == 3.0           # three applied AdamW updates
    assert all(torch.isfinite(v).all() for v in four["objective"].values())
    assert not torch.equal(four["objective"]["backbone.final_layer.linear.weight"],
                           straight[2]["objective"]["backbone.final_layer.linear.weight"])


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(fashion_dir, tmp_path, monkeypatch):
    poison(monkeypatch, {3, 5, 6, 7, 8})   # 3 alone is tolerated; 5, 6, 7 in a row stop the run
    cfg = tiny(fashion_dir, **EVERY_2, **{"train.max_bad_steps": 3})
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* last at step 7 \(kimg 0.096–0.112\): "
                       r"non-finite: loss, loss_fm; \d+ sample\(s\) .* t in \[0\.\d+, 0\.\d+\].*checkpoint-00000004\) is intact"):
        train(cfg, tmp_path / "s", show_progress=False)
    assert latest_checkpoint(tmp_path / "s").step == 4 and len(list_checkpoints(tmp_path / "s")) == 2
    assert [r["consecutive"] for r in read_log(tmp_path / "s") if r.get("event") == "nonfinite"] == [1, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------
# Saves that fail: disk full, unwritable directory
# ---------------------------------------------------------------------------------------------------
def fail_saves(monkeypatch, steps, error, before=lambda step: None):
    """Saves of ``steps`` raise ``error`` after writing their first file (a disk that fills up mid-save);
    ``before(step)`` runs as each save starts."""
    real_save, real_write = checkpoints.save_checkpoint, checkpoints.save_tensors
    state = {"writes": 0, "armed": False}

    def write(tensors, path):
        if state["armed"] and state["writes"] == 1:
            raise error
        state["writes"] += 1
        return real_write(tensors, path)

    def save(run_dir, step, **kw):
        before(step)
        state.update(writes=0, armed=step in steps)
        return real_save(run_dir, step, **kw)

    monkeypatch.setattr(checkpoints, "save_tensors", write)
    monkeypatch.setattr("fewstep.train.checkpointer.save_checkpoint", save)


def files_of(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")], ids=["ENOSPC", "EACCES"])
def test_a_failed_save_keeps_training_and_the_previous_checkpoint(fashion_dir, tmp_path, monkeypatch, straight, error):
    run, before = tmp_path / "d", {}
    fail_saves(monkeypatch, {4}, error, before=lambda step: step == 4 and before.update(
        files_of(run / "checkpoint-00000002")))                   # checkpoint 2's bytes as step 4 starts saving
    result = train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    failed = [r for r in read_log(run) if r.get("event") == "save_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 4 and os.strerror(error.errno) in failed[0]["error"]
    assert files_of(run / "checkpoint-00000002") == before        # untouched, byte for byte
    assert [p.name[-1] for p in list_checkpoints(run)] == ["2", "6", "8"]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]
    assert_same(snapshot(result.checkpoint), straight[8])          # the state in memory was never disturbed


def test_a_failed_final_save_is_an_error_and_resume_continues(fashion_dir, tmp_path, monkeypatch, straight):
    run = tmp_path / "f"
    fail_saves(monkeypatch, {8}, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointWriteError, match=r"checkpoint-00000008 .*No space left on device.*newest checkpoint "
                       r"\(checkpoint-00000006\) is intact; a checkpoint needs about .* free at least .*then run "
                       r"`train\(\) with run directory .*` to resume from it"):
        train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    assert latest_checkpoint(run).step == 6
    monkeypatch.undo()
    result = train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)   # space freed: rerun resumes
    assert_same(snapshot(result.checkpoint), straight[8])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_run_directory_during_a_save(fashion_dir, tmp_path, monkeypatch, straight):
    run = tmp_path / "ro"
    real_save = checkpoints.save_checkpoint

    def save(run_dir, step, **kw):
        if step == 4:
            run_dir.chmod(0o555)
            try:
                return real_save(run_dir, step, **kw)
            finally:
                run_dir.chmod(0o755)
        return real_save(run_dir, step, **kw)

    monkeypatch.setattr("fewstep.train.checkpointer.save_checkpoint", save)
    result = train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    assert [r["step"] for r in read_log(run) if r.get("event") == "save_failed"] == [4]
    assert_same(snapshot(result.checkpoint), straight[8])


# ---------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------
def _save(run, step, keep=0):
    return save_checkpoint(run, step, objective_state={"w": torch.full((4,), float(step))}, optimizer_state=None,
                           rng_states=[], manifest={}, keep=keep)


def test_pruning_never_deletes_the_only_good_checkpoint_behind_same_size_corruption(tmp_path):
    _save(tmp_path, 1)
    for step in (2, 3):
        f = _save(tmp_path, step) / "objective.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x01                     # a flipped bit: sizes still match the manifest
        f.write_bytes(bytes(data))
    assert prune_checkpoints(tmp_path, keep=1) == []
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["1", "2", "3"]
    _save(tmp_path, 4, keep=1)              # a new, hashed one: now the older ones may go
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".trash"))]


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error before any compute
# ---------------------------------------------------------------------------------------------------
class Items(torch.utils.data.Dataset):
    """A plugin-style dataset (no get_batch): 1×8×8 images, except the shapes given in ``odd``."""

    def __init__(self, n=32, odd=None, labels=None):
        from fewstep.contracts import DataSpec

        self.odd, self.labels_ = odd or {}, labels
        self.spec = DataSpec(name="items", channels=1, resolution=8, num_classes=10, num_items=n)

    def __len__(self):
        return self.spec.num_items

    def __getitem__(self, i):
        return torch.zeros(self.odd.get(i, (1, 8, 8))), torch.tensor(i % 10)


def in_memory(n, labels):
    return InMemoryImageDataset(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.tensor(labels), name="mem",
                                num_classes=10)


@pytest.fixture
def plugin_data():
    made = {}
    datasets.add("test-items", lambda cfg: made["dataset"]())
    yield made
    datasets.remove("test-items")


@pytest.mark.parametrize("make, message, on_load", [
    (lambda: in_memory(0, []), r"dataset 'test-items' is empty \(0 items\)", True),
    (lambda: in_memory(4, [0, 3, 12, 1]), r"label 12 of item 2 is outside \[0, 10\)", True),
    (lambda: Items(odd={31: (3, 8, 8)}), r"item 31 is \(3, 8, 8\).*mixed sizes or channel counts", True),
    # Plugin datasets' other items are checked as they are loaded (in the first batch, here).
    (lambda: Items(odd=dict.fromkeys(range(1, 31), (1, 16, 16))),
     r"item \d+ is \(1, 16, 16\).*spec says float \(C, H, W\) = \(1, 8, 8\)", False),
    (lambda: Items(odd=dict.fromkeys(range(1, 31), (3, 8, 8))), r"item \d+ is \(3, 8, 8\)", False),
], ids=["empty", "label-range", "last-item-channels", "mixed-sizes", "mixed-channels"])
def test_bad_data_is_refused_before_any_compute(fashion_dir, tmp_path, monkeypatch, plugin_data, make, message,
                                                on_load):
    plugin_data["dataset"] = make
    monkeypatch.setattr(FlowMatching, "forward", lambda *a, **k: pytest.fail("computed on bad input"))
    cfg = tiny(fashion_dir, **{"data.name": "test-items", "backbone.patch_size": 2})
    with pytest.raises(DataError, match=message):
        train(cfg, tmp_path / "x", show_progress=False)
    assert (tmp_path / "x").exists() != on_load   # refused on loading: no run directory is left behind


@pytest.mark.parametrize("change, error, message", [
    (lambda c: setattr(c.train, "batch", "16"), ConfigError, r"train.batch must be an integer, got '16'"),
    (lambda c: setattr(c.train, "max_bad_steps", 0), ConfigError, r"train.max_bad_steps must be ≥ 1"),
    (lambda c: setattr(c.train, "batch_per_gpu", 5), ConfigError, r"train.batch=16 must be divisible by devices"),
    (lambda c: setattr(c.data, "num_workers", None), ConfigError, r"data.num_workers must be an integer"),
    (lambda c: setattr(c.train, "ema_betas", {"ema": 1.0}), ConfigError, r"train.ema_betas\['ema'\] must be a decay in \[0, 1\)"),
    (lambda c: setattr(c.train, "lr", 0.0), ConfigError, r"train.lr must be a finite number > 0, got 0.0"),
    (lambda c: setattr(c.train, "lr", float("nan")), ConfigError, r"train.lr must be a finite number > 0, got nan"),
    (lambda c: setattr(c.sample, "nfe", (1, 0)), ConfigError, r"sample.nfe must be ≥ 1 jumps each, got \[1, 0\]"),
    (lambda c: setattr(c.sample, "weights", "emma"), ConfigError, r"sample.weights must be 'online' or an EMA track .*\(ema\)"),
    (lambda c: setattr(c.data, "name", "fashion-mnst"), RegistryError, r"did you mean 'fashion-mnist'"),
    (lambda c: setattr(c.data, "root", "/no/such/dir"), ConfigError, r"data.root='/no/such/dir' does not exist"),
])
def test_bad_config_values_are_refused_before_any_compute(fashion_dir, tmp_path, monkeypatch, change, error, message):
    cfg = tiny(fashion_dir)
    change(cfg)
    monkeypatch.setattr(FlowMatching, "forward", lambda *a, **k: pytest.fail("computed on bad input"))
    with pytest.raises(error, match=message):
        train(cfg, tmp_path / "x", show_progress=False)


def test_a_checkpoint_of_another_config_is_refused(fashion_dir, tmp_path, monkeypatch):
    run = tmp_path / "c"
    train(tiny(fashion_dir, **{"train.total_kimg": 0.032}), run, show_progress=False)
    (run / "config.json").unlink()        # only the checkpoint's own manifest knows what it is
    monkeypatch.setattr(FlowMatching, "forward", lambda *a, **k: pytest.fail("computed on bad input"))
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint-00000002 belongs to a run with a different "
                       r"config \(backbone.hidden_size: 32 → 48\)"):
        train(tiny(fashion_dir, **{"backbone.hidden_size": 48}), run, show_progress=False)
    assert not (run / "config.json").exists()   # nothing written before the check
    # A checkpoint whose manifest matches but whose tensors do not (hand-edited, another model's weights).
    ckpt = latest_checkpoint(run)
    state = ckpt.tensors("objective.safetensors")
    dropped = next(k for k in state if k.startswith("ema."))
    del state[dropped]
    name = "backbone.final_layer.linear.weight"
    state[name] = state[name][:, :-1]
    save_checkpoint(run, 3, objective_state=state, optimizer_state=None, rng_states=[],
                    manifest={k: ckpt.manifest[k] for k in ("nimg", "data_position", "config", "data_spec")})
    with pytest.raises(CheckpointError, match=rf"checkpoint-00000003 does not match the configured model: "
                       rf"missing \['{dropped}'\]; shape \['{name} \(\d+, 31\) vs \(\d+, 32\)'\]"):
        train(tiny(fashion_dir), run, show_progress=False)


def test_unwritable_or_busy_run_directories_are_refused(fashion_dir, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot write to the run directory .*file/run"):
        train(tiny(fashion_dir), tmp_path / "file" / "run", show_progress=False)
    with RunLock(tmp_path / "busy"):
        with pytest.raises(ConfigError, match=rf"in use by another training process \(pid {os.getpid()}\)"):
            train(tiny(fashion_dir), tmp_path / "busy", show_progress=False)


# ---------------------------------------------------------------------------------------------------
# Run directories that cannot simply be resumed
# ---------------------------------------------------------------------------------------------------
def test_a_run_whose_checkpoints_are_all_broken_is_refused_and_restart_moves_them_aside(fashion_dir, tmp_path,
                                                                                        monkeypatch, straight):
    run = tmp_path / "b"
    train(tiny(fashion_dir, **EVERY_2, **{"train.total_kimg": 0.064}), run, show_progress=False)   # steps 2, 4
    for path in list_checkpoints(run):
        weights = path / "objective.safetensors"
        weights.write_bytes(weights.read_bytes()[:-5])
    broken = {p.name: files_of(p) for p in list_checkpoints(run)}
    with monkeypatch.context() as m:
        m.setattr(FlowMatching, "forward", lambda *a, **k: pytest.fail("computed on bad input"))
        with pytest.raises(ConfigError, match=r"every checkpoint in .* is broken \(.*checkpoint-00000002/objective."
                           r"safetensors is truncated.*; .*checkpoint-00000004/objective.safetensors is truncated"
                           r".*\); they are kept for inspection.*rerun with --restart"):
            train(tiny(fashion_dir, **EVERY_2), run, show_progress=False)
    assert {p.name: files_of(p) for p in list_checkpoints(run)} == broken   # untouched
    result = train(tiny(fashion_dir, **EVERY_2), run, show_progress=False, restart=True)
    assert_same(snapshot(result.checkpoint), straight[8])                   # from step 0, exactly
    aside = [p for p in run.iterdir() if p.name.startswith("restarted-")]
    assert len(aside) == 1 and {p.name: files_of(p) for p in list_checkpoints(aside[0])} == broken
    assert (aside[0] / "log.jsonl").is_file() and (aside[0] / "config.json").is_file()
    assert [r["event"] for r in read_log(run) if "event" in r][:2] == ["start", "restarted"]


def test_a_run_directory_without_a_checkpoint_takes_a_corrected_config(fashion_dir, tmp_path, monkeypatch):
    run = tmp_path / "n"
    with monkeypatch.context() as m:
        poison(m, set(range(1, 9)))                                  # a blow-up from the first step
        with pytest.raises(NonFiniteLossError, match=r"none written yet"):
            train(tiny(fashion_dir, **{"train.max_bad_steps": 2}), run, show_progress=False)
    assert not list_checkpoints(run) and (run / "config.json").is_file()
    result = train(tiny(fashion_dir, **{"train.lr": 5e-5}), run, show_progress=False)   # the corrected config
    assert result.step == 8
    replaced = [r for r in read_log(run) if r.get("event") == "config_replaced"]
    assert len(replaced) == 1 and "train.lr: 0.001 → 5e-05" in replaced[0]["message"]
    assert json.loads((run / "config.json").read_text())["config"]["train"]["lr"] == 5e-5
    with pytest.raises(ConfigError, match=r"belongs to a run with a different config \(train.lr: 5e-05 → 0.001\)"):
        train(tiny(fashion_dir), run, show_progress=False)          # with a checkpoint: the usual refusal


def test_a_garbage_config_json_is_named(fashion_dir, tmp_path):
    run = tmp_path / "g"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{run}/config.json is not valid JSON"):
        train(tiny(fashion_dir), run, show_progress=False)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"is not a fewstep run config"):
        train(tiny(fashion_dir), run, show_progress=False)
