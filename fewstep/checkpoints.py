"""Self-describing, atomically written checkpoints.

A checkpoint is a directory ``checkpoint-<step>`` in the run directory holding

* ``objective.safetensors``: every tensor of the objective (``backbone.*``, ``ema.<track>.*`` and any
  teacher), so ``fewstep sample`` can read just the weights it needs;
* ``optimizer.safetensors``: the optimizer's tensors (its scalar state lives in the manifest);
* ``rng-rank<r>.safetensors``: RNG states of each process;
* ``manifest.json``: format version, step, kimg, the resolved run config, the data spec, training
  state (data position …) and the SHA-256 and size of every file above.

It is written under a temporary name (``.tmp-checkpoint-<step>-<pid>``), every file and both directories
are fsynced, and the directory is renamed into place, so a process killed at any point of a save leaves
the previous checkpoints intact (the stale temporary directory is removed by the next save). A
checkpoint whose files do not match its manifest (missing, truncated, flipped bits) is reported by name
and skipped. Pruning renames a checkpoint out of the way (``.trash-…``) before deleting it, and never
deletes anything unless a newer checkpoint passed a full SHA-256 check.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from fewstep.files import save_tensors, sha256_of, write_json

FORMAT = "fewstep-checkpoint"
VERSION = 1
PREFIX = "checkpoint-"
TMP = ".tmp-"       # a checkpoint being written: .tmp-checkpoint-<step>-<pid>
TRASH = ".trash-"   # a checkpoint being deleted: .trash-checkpoint-<step>-<pid>


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupted checkpoint."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, unwritable directory); earlier ones are untouched."""


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
        return int(self.field("step"))

    def field(self, name: str) -> Any:
        """The manifest's ``name`` entry; a :class:`CheckpointError` naming the checkpoint when it is missing."""
        if name not in self.manifest:
            raise CheckpointError(f"checkpoint {self.path} has no {name!r} in its manifest.json (it was not "
                                  f"written by this fewstep version, or was edited); use another checkpoint")
        return self.manifest[name]

    def tensors(self, name: str, prefix: str = "") -> dict[str, Tensor]:
        """Tensors of file ``name`` (e.g. ``objective.safetensors``) whose keys start with ``prefix``."""
        file = self.path / name
        try:
            if not prefix:
                return load_file(file)
            out = {}
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key)
            return out
        except Exception as exc:   # unreadable (another user's run), or safetensors' own error for a bad file
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CheckpointError(f"cannot read {file}: {reason}") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    Any ``OSError`` (disk full, permissions; also when safetensors reports it) propagates after the
    temporary directory is removed; the checkpoints already on disk are never touched by a failed save.
    A broken checkpoint of the same step is moved aside (:func:`move_aside`), never deleted.

    Args:
        objective_state: ``objective.state_dict()`` (unwrapped).
        optimizer_state: ``optimizer.state_dict()`` or ``None``.
        rng_states: one dict of RNG-state tensors per process rank.
        manifest: JSON-able fields added to the manifest (config, kimg, data position, …).
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f"{TMP}{PREFIX}{step:08d}-{os.getpid()}"
    remove_stale(run_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_tensors(objective_state, tmp / "objective.safetensors")
        extra = {}
        if optimizer_state is not None:
            tensors, extra = optimizer_to_flat(optimizer_state)
            save_tensors(tensors, tmp / "optimizer.safetensors")
        for rank, rng in enumerate(rng_states):
            save_tensors(rng, tmp / f"rng-rank{rank}.safetensors")
        files = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        body = {"format": FORMAT, "version": VERSION, "step": step, **manifest,
                "optimizer": extra or None, "files": files}
        write_json(tmp / "manifest.json", body, fsync=True)
        _fsync_dir(tmp)
        if final.exists():   # a re-save of the same step: the old one moves aside only once the new is complete
            try:
                verify_checkpoint(final, hashes=False)
                _discard(final)
            except CheckpointError:   # a broken one is kept for inspection, never deleted
                move_aside(run_dir, [final], "broken")
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        prune_checkpoints(run_dir, keep, verified=final)
    return final


def _discard(path: Path) -> None:
    """Rename ``path`` to ``.trash-<name>-<pid>`` (atomic: it stops being a checkpoint), then delete it."""
    trash = path.with_name(f"{TRASH}{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def move_aside(run_dir: str | os.PathLike, paths: list[Path], why: str) -> Path:
    """Move ``paths`` (checkpoints, logs …) of ``run_dir`` into a new folder ``<why>-<UTC time>/`` in it, where
    nothing reads them again (not a ``checkpoint-*``) but everything stays for inspection. Returns the folder."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    folder, n = run_dir / f"{why}-{stamp}", 1
    while folder.exists():
        n += 1
        folder = run_dir / f"{why}-{stamp}-{n}"
    folder.mkdir()
    for path in paths:
        os.replace(path, folder / path.name)
    _fsync_dir(run_dir)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary and trash directories left by processes that died during a save or prune.

    Directories of processes still alive (on this host) are left alone. Returns what was removed.
    """
    removed = []
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return removed
    for path in run_dir.iterdir():
        if not (path.name.startswith(TMP) or path.name.startswith(TRASH)) or not path.is_dir():
            continue
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> Checkpoint:
    """Parse the manifest and check every listed file's size (and SHA-256 when ``hashes``)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a corrupted manifest.json: {exc}") from exc
    except OSError as exc:   # another user's run we may not read, an I/O error
        raise CheckpointError(f"cannot read {manifest_path}: {exc.strerror or exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise CheckpointError(f"{path} is not a fewstep checkpoint of version {VERSION} "
                              f"(format {found.get('format')!r}, version {found.get('version')!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(i, dict) and {"bytes", "sha256"} <= i.keys()
                                              for i in files.values()):
        raise CheckpointError(f"checkpoint {path} has a manifest.json without a valid 'files' table")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupted: "
                                  f"{file.stat().st_size} bytes, manifest says {info['bytes']}")
        try:
            if hashes and sha256_of(file) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {file} is corrupted: SHA-256 does not match its manifest")
        except OSError as exc:
            raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from exc
    return Checkpoint(path, manifest)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories of a run (complete or not), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(run_dir: str | os.PathLike, hashes: bool = True,
                      report: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; broken ones are reported by name and skipped.

    Args:
        hashes: check SHA-256 (not only sizes).
        report: called with a message for each skipped checkpoint (default: ``warnings.warn``).
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return verify_checkpoint(path, hashes=hashes)
        except CheckpointError as exc:
            message = f"skipping checkpoint: {exc}"
            if report is None:
                warnings.warn(message, stacklevel=2)
            else:
                report(message)
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, verified: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` valid checkpoints; returns the deleted ones.

    Broken checkpoints are neither counted nor deleted (they stay for inspection). Nothing is deleted
    unless a newer kept checkpoint passed a full SHA-256 check: ``verified`` (the checkpoint just
    written, whose hashes were computed from its files) counts as checked; otherwise the newest
    candidates are hashed until one passes. So the only good checkpoint is never deleted, even when
    newer ones are corrupted with their sizes intact.
    """
    kept, anchored, deleted = 0, False, []
    for path in reversed(list_checkpoints(run_dir)):
        trusted = verified is not None and path == Path(verified)
        try:
            verify_checkpoint(path, hashes=not (anchored or trusted))
        except CheckpointError:
            continue
        if kept < keep:
            kept, anchored = kept + 1, True
        elif anchored:
            try:
                _discard(path)
                deleted.append(path)
            except OSError as exc:   # the save itself succeeded; an undeletable old checkpoint is no error
                warnings.warn(f"could not delete old checkpoint {path}: {exc}", stacklevel=2)
    return deleted


def load_optimizer_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The optimizer state dict stored in ``ckpt`` (``None`` if it has none)."""
    if ckpt.manifest.get("optimizer") is None:
        return None
    return optimizer_from_flat(ckpt.tensors("optimizer.safetensors"), ckpt.field("optimizer"))
