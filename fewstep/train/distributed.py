"""Many processes: DDP through Accelerate, or FSDP2 (``fully_shard``) applied by fewstep itself.

``train.distributed`` says how the objective (an ``nn.Module`` that owns the backbone, its EMA tracks and
any teacher) is spread over the processes of a ``torchrun`` / ``accelerate launch`` job:

* ``ddp`` (default): Accelerate prepares the *objective*, so DDP wraps it and every JVP runs inside the
  wrapped forward; backward all-reduces the averaged gradient. Every rank holds the whole model; DDP
  broadcasts rank 0's weights (EMA tracks and teacher included) when it wraps.
* ``fsdp2``: rank 0's weights are broadcast, then every backbone in the objective (the online net, the
  teacher, each EMA track: modules of the online backbone's class) has each of its ``compile_regions()``
  (the DiT's blocks) and itself sharded with ``torch.distributed.fsdp.fully_shard``, then the objective
  root. Every parameter becomes a DTensor sharded on dim 0 over one mesh, the same placement for the
  online net and its copies, so :func:`fewstep.ema.ema_update` (``_foreach_lerp_``) updates
  local shards with no communication. The JVP still runs inside the root's forward; the blocks'
  all-gathers fire because the DiT enters blocks through ``__call__``. An EMA track is never called in
  training, so it is never gathered. Checkpoints hold full (unsharded) tensors, gathered on every rank
  and written by rank 0, in the same format as DDP checkpoints (either mode resumes the other's run).
  Sample grids use a plain copy rebuilt on rank 0 from the gathered state.

Accelerate's own FSDP/DeepSpeed plugins (``accelerate launch --use_fsdp``, an FSDP ``accelerate config``)
are refused with a message: fewstep shards itself, because the EMA tracks and teacher must be sharded
exactly like the online net. Accelerate only supports FSDP on accelerators, while ``fully_shard`` also
runs on CPU (gloo), which is how the tests check it.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any, Callable, Iterator, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from fewstep.config import ConfigError

MODES = ("ddp", "fsdp2")


def check_launch(accelerator: Accelerator, mode: str) -> None:
    """Refuse launch setups fewstep cannot honour, naming the fix."""
    if mode not in MODES:
        raise ConfigError(f"train.distributed must be one of {', '.join(MODES)}, got {mode!r}")
    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ConfigError(
            f"the launcher asked Accelerate for {kind.value} (accelerate config / --use_fsdp / --use_deepspeed), "
            f"which fewstep does not use: the objective's EMA tracks and teacher must be sharded like the "
            f"online net. Launch with a plain multi-GPU config (distributed_type: MULTI_GPU) or torchrun, "
            f"and set train.distributed=fsdp2 to shard")
    if mode == "fsdp2" and not torch.distributed.is_available():
        raise ConfigError("train.distributed=fsdp2 needs torch.distributed, which this torch build lacks")


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full(value: Any) -> Any:
    """The whole tensor behind a DTensor (an all-gather: call on every rank in the same order);
    anything else unchanged."""
    return value.full_tensor() if _is_dtensor(value) else value


class Parallel:
    """One training run's data-parallel strategy (see the module docstring).

    Args:
        mode: ``ddp`` or ``fsdp2`` (``train.distributed``).
        accelerator: the run's Accelerator (rank, world, device, mixed precision).
    """

    def __init__(self, mode: str, accelerator: Accelerator):
        check_launch(accelerator, mode)
        destroy_group_at_exit()   # also when training fails
        self.mode, self.accelerator = mode, accelerator
        self.world = accelerator.num_processes
        self.fsdp = mode == "fsdp2"
        self.mesh = None

    def finish(self) -> None:
        """End of a run: finish trackers. The process group stays up, so ``train()`` can run again in
        this process (Accelerate's ``end_training`` destroys it, and its state singleton would not
        re-create it); it is destroyed when the interpreter exits (registered in ``__init__``)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    # -- setup ----------------------------------------------------------------------------------
    def shard(self, objective: nn.Module) -> nn.Module:
        """FSDP2: broadcast rank 0's tensors, then ``fully_shard`` the backbones (region by region) and
        the objective, in place. DDP: nothing (Accelerate wraps in :meth:`prepare`). Call after loading
        a checkpoint and compiling, before building the optimizer."""
        if not self.fsdp:
            return objective
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.world > 1:   # each rank initialised with its own seed: make them rank 0's, as DDP does
            with torch.no_grad():
                for tensor in [*objective.parameters(), *objective.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)
        self.mesh = init_device_mesh(self.accelerator.device.type, (self.world,))
        online = getattr(objective, "backbone", None)
        kind = type(online) if online is not None else None
        for module in [m for m in objective.modules() if kind is not None and type(m) is kind]:
            regions = getattr(module, "compile_regions", None)
            for region in (regions() if callable(regions) else []):
                fully_shard(region, mesh=self.mesh)
            fully_shard(module, mesh=self.mesh)
        fully_shard(objective, mesh=self.mesh)
        return objective

    def prepare(self, objective: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """DDP: ``accelerator.prepare`` (wraps the objective). FSDP2: the sharded objective itself, its
        forward run under the Accelerator's autocast when mixed precision is on."""
        if not self.fsdp:
            return self.accelerator.prepare(objective, optimizer)
        if self.accelerator.mixed_precision != "no":
            forward, autocast = objective.forward, self.accelerator.autocast

            def autocast_forward(*args: Any, **kwargs: Any) -> Any:
                with autocast():
                    return forward(*args, **kwargs)

            objective.forward = autocast_forward
        return objective, optimizer

    # -- per step -------------------------------------------------------------------------------
    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """No gradient synchronisation for this micro-step (accumulation rounds) unless ``sync``."""
        if sync:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(model)
        return self.accelerator.no_sync(model)

    def grad_norm(self, norm: Tensor | None) -> Tensor | None:
        """The global gradient norm as a plain tensor (FSDP2's clip returns a DTensor)."""
        return full(norm) if self.fsdp and norm is not None else norm

    # -- saving and sampling --------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The full ``state_dict`` of the unwrapped objective on rank 0 (``None`` elsewhere). FSDP2
        gathers tensor by tensor on every rank (collective) and keeps CPU copies on rank 0 only."""
        module = self.accelerator.unwrap_model(model)
        main = self.accelerator.is_main_process
        if not self.fsdp:
            return module.state_dict() if main else None
        out = {}
        for key, value in module.state_dict().items():
            value = full(value)
            if main:
                out[key] = value.detach().cpu()
        return out if main else None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """``optimizer.state_dict()`` with full tensors on rank 0 (``None`` elsewhere); collective under FSDP2."""
        main = self.accelerator.is_main_process
        state = optimizer.state_dict()
        if not self.fsdp:
            return state if main else None
        gathered = {}
        for pid in sorted(state["state"]):
            entry = {}
            for key in sorted(state["state"][pid]):
                value = full(state["state"][pid][key])
                entry[key] = value.detach().cpu() if torch.is_tensor(value) else value
            gathered[pid] = entry
        return {"state": gathered, "param_groups": state["param_groups"]} if main else None

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             params: list[nn.Parameter]) -> None:
        """Load a full (checkpoint) optimizer state; under FSDP2 each per-parameter tensor is cut to
        this rank's shard of its parameter (every rank holds the full state: no communication)."""
        if self.fsdp:
            from torch.distributed.tensor import distribute_tensor

            shards = {}
            for pid, entry in state["state"].items():
                p = params[int(pid)]
                shards[pid] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                                   if torch.is_tensor(v) and _is_dtensor(p) and v.shape == p.shape else v)
                               for k, v in entry.items()}
            state = {"state": shards, "param_groups": state["param_groups"]}
        optimizer.load_state_dict(state)

    def sampling_objective(self, model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
        """The objective to sample or evaluate with on rank 0 (``None`` elsewhere). DDP: the unwrapped
        objective. FSDP2: a plain copy (``rebuild()`` on the meta device, then the gathered full state;
        collective: call on every rank)."""
        if not self.fsdp:
            return self.accelerator.unwrap_model(model) if self.accelerator.is_main_process else None
        state = self.model_state(model)
        if state is None:
            return None
        with torch.device("meta"):
            plain = rebuild()
        plain = plain.to_empty(device=self.accelerator.device)
        plain.load_state_dict(state)
        return plain.eval()


_exit_hook = []


def exit_process(code: int) -> NoReturn:
    """End a process of a multi-process launch with exit status ``code``, skipping interpreter finalisation.

    After a successful command every rank waits for the others and destroys the process group; then
    output is flushed and the process ends with ``os._exit``. Letting the interpreter finalise instead
    sometimes aborted gloo ranks ("terminate called without an active exception", SIGABRT, no Python
    frame: C++ threads torn down during finalisation), which failed commands that had finished their
    work. Everything fewstep writes is complete (atomic renames) before this point."""
    if code == 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy_group_at_exit() -> None:
    """Destroy the default process group at interpreter exit (once), as NCCL asks, for training
    driven from Python. The CLI ends its ranks with :func:`exit_process` instead, which also avoids the
    gloo aborts during interpreter finalisation that this hook alone did not."""
    if _exit_hook or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return

    def destroy() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)
    _exit_hook.append(destroy)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
