"""Self-describing, atomically written checkpoints.

A checkpoint is a directory ``checkpoint-<step>`` in the run directory holding

* ``objective.safetensors``: every tensor of the objective (``backbone.*``, ``ema.<track>.*`` and any
  teacher), so ``fewstep sample`` can read just the weights it needs;
* ``optimizer.safetensors``: the optimizer's tensors (its scalar state lives in the manifest);
* ``rng-rank<r>.safetensors``: RNG states of each process;
* ``manifest.json``: format version, step, kimg, the resolved run config, the data spec, training
  state (data position …) and the SHA-256 and size of every file above.

It is written under a temporary name, fsynced and renamed, so a crash during a save leaves the previous
checkpoints intact; a checkpoint whose files do not match its manifest is reported and skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "fewstep-checkpoint"
VERSION = 1
PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupted checkpoint."""


@dataclass
class Checkpoint:
    """A verified checkpoint on disk.

    Attributes:
        path: the checkpoint directory.
        manifest: its parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def tensors(self, name: str, prefix: str = "") -> dict[str, Tensor]:
        """Tensors of file ``name`` (e.g. ``objective.safetensors``) whose keys start with ``prefix``."""
        file = self.path / name
        if not prefix:
            return load_file(file)
        out = {}
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = f.get_tensor(key)
        return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------
# Optimizer state ↔ flat tensors + JSON
# ---------------------------------------------------------------------------------------------------
def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<key>``) and JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_flat`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------
# Save / find / load
# ---------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | os.PathLike, step: int, *, objective_state: dict[str, Tensor],
                    optimizer_state: dict[str, Any] | None, rng_states: list[dict[str, Tensor]],
                    manifest: dict[str, Any], keep: int = 0) -> Path:
    """Write ``checkpoint-<step>`` atomically and prune to the newest ``keep`` (0 = keep all).

    Args:
        objective_state: ``objective.state_dict()`` (unwrapped).
        optimizer_state: ``optimizer.state_dict()`` or ``None``.
        rng_states: one dict of RNG-state tensors per process rank.
        manifest: JSON-able fields added to the manifest (config, kimg, data position, …).
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _save_tensors(objective_state, tmp / "objective.safetensors")
        extra = {}
        if optimizer_state is not None:
            tensors, extra = optimizer_to_flat(optimizer_state)
            _save_tensors(tensors, tmp / "optimizer.safetensors")
        for rank, rng in enumerate(rng_states):
            _save_tensors(rng, tmp / f"rng-rank{rank}.safetensors")
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        body = {"format": FORMAT, "version": VERSION, "step": step, **manifest,
                "optimizer": extra or None, "files": files}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step replaces the old one only once the new is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        prune_checkpoints(run_dir, keep)
    return final


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> Checkpoint:
    """Parse the manifest and check every listed file's size (and SHA-256 when ``hashes``)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupted manifest.json: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fewstep checkpoint of version {VERSION} "
                              f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupted: "
                                  f"{file.stat().st_size} bytes, manifest says {info['bytes']}")
        if hashes and _sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: SHA-256 does not match its manifest")
    return Checkpoint(path, manifest)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run (complete or not), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | os.PathLike, hashes: bool = True) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are reported by name and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return verify_checkpoint(path, hashes=hashes)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` *valid* checkpoints; never deletes the only good one."""
    good = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path, hashes=False)
            good.append(path)
        except CheckpointError:
            continue
    for path in good[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def load_optimizer_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The optimizer state dict stored in ``ckpt`` (``None`` if it has none)."""
    if ckpt.manifest.get("optimizer") is None:
        return None
    return optimizer_from_flat(ckpt.tensors("optimizer.safetensors"), ckpt.manifest["optimizer"])
