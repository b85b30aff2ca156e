"""A run's checkpoints during training: restore one, save once per step, survive failed saves.

Saving gathers the full state on every rank and rank 0 writes it (:func:`fewstep.checkpoints.save_checkpoint`:
atomic, pruned to ``train.keep_checkpoints``). A save that fails (a full disk, permissions; whatever the
library's error type) leaves the earlier checkpoints as they were and keeps the state in memory: at an
interval it is reported and retried at the next one; at the end of training it is a
:class:`~fewstep.checkpoints.CheckpointWriteError` that says what to free and the command that resumes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from fewstep import __version__
from fewstep.build import load_state
from fewstep.checkpoints import Checkpoint, CheckpointWriteError, load_optimizer_state, save_checkpoint
from fewstep.config import RunConfig, to_dict
from fewstep.contracts import DataSpec
from fewstep.files import describe_os_error, free_bytes, is_disk_full, size_text
from fewstep.train.distributed import Parallel
from fewstep.train.state import TrainState
from fewstep.train.status import StatusLog


def _bytes(tree: Any) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_bytes(v) for v in tree)
    return 0


class Checkpointer:
    """Restores and saves one run's checkpoints (see the module docstring).

    Args:
        run_dir: the run directory.
        cfg, spec: the run's resolved config and data spec (saved in every manifest).
        accelerator, parallel: the run's processes and data-parallel wrapper (states are gathered on
            every rank, written by rank 0).
        status: where failed saves are reported.
        resume: how to resume this run, for messages (``fewstep train … --out DIR``).
        start: the checkpoint the run resumed from, if any (the newest intact one so far).
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, spec: DataSpec, accelerator: Accelerator, parallel: Parallel,
                 status: StatusLog, resume: str, start: Checkpoint | None):
        self.run_dir, self.cfg, self.spec = run_dir, cfg, spec
        self.accelerator, self.parallel, self.status, self.resume = accelerator, parallel, status, resume
        self.newest: Path | None = start.path if start else None
        self._saved_step = start.step if start else -1

    @staticmethod
    def restore(ckpt: Checkpoint, objective: torch.nn.Module, generator: torch.Generator, rank: int,
                device: torch.device) -> tuple[TrainState, dict[str, Any] | None]:
        """Load ``ckpt``'s weights into ``objective`` and this rank's RNG states; return the training state
        and the optimizer state (loaded into the optimizer once it exists)."""
        load_state(objective, ckpt)
        rng_file = ckpt.path / f"rng-rank{rank}.safetensors"
        if rng_file.exists():   # a resume on more ranks than saved: the new ranks keep their fresh seeds
            rng = ckpt.tensors(rng_file.name)
            torch.set_rng_state(rng["cpu"])
            generator.set_state(rng["objective"].to(generator.get_state().device))
            if device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)
        return TrainState.from_checkpoint(ckpt), load_optimizer_state(ckpt)

    def save(self, state: TrainState, model: torch.nn.Module, optimizer: Any, generator: torch.Generator,
             final: bool) -> Path | None:
        """Write ``checkpoint-<state.step>`` (once per step; collective: call on every rank).

        A failure keeps the state in memory and leaves older checkpoints untouched: with ``final`` it
        raises :class:`CheckpointWriteError`, otherwise it is reported and ``None`` returned (the caller
        tries again at the next interval).
        """
        if self._saved_step == state.step:
            return self.newest
        acc, device = self.accelerator, self.accelerator.device
        rng = {"cpu": torch.get_rng_state(), "objective": generator.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = acc.gather_for_metrics([rng], use_gather_object=True) if acc.num_processes > 1 else [rng]
        weights, opt = self.parallel.model_state(model), self.parallel.optimizer_state(optimizer)   # full; on rank 0
        path, error = None, None
        if acc.is_main_process:
            try:
                path = save_checkpoint(
                    self.run_dir, state.step, objective_state=weights, optimizer_state=opt, rng_states=rngs,
                    keep=self.cfg.train.keep_checkpoints,
                    manifest={**state.manifest(), "config": to_dict(self.cfg),
                              "data_spec": dataclasses.asdict(self.spec), "fewstep_version": __version__,
                              "torch_version": torch.__version__,
                              "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None})
            except OSError as exc:   # also safetensors' own error for a full disk (fewstep.files)
                error = (exc, _bytes(weights) + _bytes(opt) + _bytes(rngs))
        acc.wait_for_everyone()
        if error is None:
            self._saved_step, self.newest = state.step, path
            return path
        return self._failed(state, *error, final=final)

    def _failed(self, state: TrainState, exc: OSError, size: int, final: bool) -> None:
        newest = self.newest.name if self.newest else "none yet"
        where = f"checkpoint-{state.step:08d} in {self.run_dir}"
        if final:
            if is_disk_full(exc):
                free = free_bytes(self.run_dir) or 0
                fix = (f"a checkpoint needs about {size_text(size)} and {size_text(free)} are free there: free at "
                       f"least {size_text(max(size - free, 0) * 1.1 + 2**20)}")
            else:
                fix = "fix the directory's permissions or the device"
            raise CheckpointWriteError(
                f"could not write {where}: {describe_os_error(exc)}. The newest checkpoint ({newest}) is intact; "
                f"{fix}, then run `{self.resume}` to resume from it") from exc
        self.status.event({"event": "save_failed", "step": state.step, "kimg": state.kimg, "error": str(exc)},
                          f"could not write {where}: {describe_os_error(exc)}; the training state is "
                          f"still in memory and the newest checkpoint ({newest}) is untouched. Training goes "
                          f"on and saving is retried at the next checkpoint interval")
        return None
