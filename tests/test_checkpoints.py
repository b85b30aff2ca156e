"""Checkpoints: atomic layout, verification, corruption detection, pruning, optimizer round trip."""
from __future__ import annotations

import json

import pytest
import torch

from fewstep.checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints, load_optimizer_state,
                                 prune_checkpoints,
                                 optimizer_from_flat, optimizer_to_flat, save_checkpoint, verify_checkpoint)


def _state(step: int) -> dict:
    return {"w": torch.full((3, 2), float(step)), "b": torch.arange(4)}


def _save(run, step, keep=0):
    return save_checkpoint(run, step, objective_state=_state(step), optimizer_state=None,
                           rng_states=[{"cpu": torch.get_rng_state()}], manifest={"nimg": step}, keep=keep)


def test_save_verify_and_read(tmp_path):
    path = _save(tmp_path, 7)
    assert path.name == "checkpoint-00000007"
    ckpt = verify_checkpoint(path)
    assert ckpt.step == 7 and ckpt.manifest["nimg"] == 7
    assert torch.equal(ckpt.tensors("objective.safetensors")["w"], _state(7)["w"])
    assert set(ckpt.tensors("objective.safetensors", prefix="b")) == {""}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_latest_skips_corrupted_and_incomplete(tmp_path):
    _save(tmp_path, 1)
    p2 = _save(tmp_path, 2)
    p3 = _save(tmp_path, 3)
    (p3 / "manifest.json").unlink()                     # incomplete
    data = bytearray((p2 / "objective.safetensors").read_bytes())
    data[-1] ^= 0xFF                                     # same size, flipped bit
    (p2 / "objective.safetensors").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checkpoint-00000002.*SHA-256"):
        ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 1


def test_truncated_file_is_named(tmp_path):
    p = _save(tmp_path, 4)
    f = p / "objective.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"objective.safetensors is truncated or corrupted"):
        verify_checkpoint(p)


def test_corrupt_manifest_is_reported(tmp_path):
    p = _save(tmp_path, 5)
    (p / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted manifest.json"):
        verify_checkpoint(p)


def test_prune_keeps_newest_good_ones_and_leaves_broken_ones_alone(tmp_path):
    for s in range(1, 5):
        _save(tmp_path, s)
    (list_checkpoints(tmp_path)[-1] / "manifest.json").unlink()   # checkpoint 4 is broken
    _save(tmp_path, 5, keep=2)
    names = [p.name[-1] for p in list_checkpoints(tmp_path)]
    assert names == ["3", "4", "5"]   # two good ones kept; the broken one is not counted nor deleted


def test_prune_never_deletes_the_only_good_checkpoint(tmp_path):
    _save(tmp_path, 1)
    for s in (2, 3):
        (_save(tmp_path, s) / "manifest.json").unlink()   # newer saves that never completed
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name[-1] for p in list_checkpoints(tmp_path)] == ["1", "2", "3"]
    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_checkpoint(tmp_path).step == 1


def test_optimizer_state_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_flat(opt.state_dict())
    json.dumps(meta)   # JSON-able
    back = optimizer_from_flat(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW(model.parameters(), lr=1.0)
    opt2.load_state_dict(back)
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    path = save_checkpoint(tmp_path, 1, objective_state=_state(1), optimizer_state=opt.state_dict(),
                           rng_states=[], manifest={})
    loaded = load_optimizer_state(verify_checkpoint(path))
    assert torch.equal(loaded["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
