"""``fewstep bench step`` under several processes (``torchrun`` / ``accelerate launch``): data-parallel
scaling of one objective's training step.

Every rank builds the same objective and first times its step **alone** (no communication: what one GPU
does), then the same step **wrapped** as training wraps it (``train.distributed``: DDP through Accelerate,
or FSDP2 ``fully_shard``), each rank on its own ``batch`` images. Both are timed in the same processes, so

    scaling efficiency = (images/s per GPU wrapped) / (images/s alone) = t_alone / t_wrapped,

with each time the slowest rank's median (an all-reduce of the maximum). 100 % means the gradient
all-reduce (DDP) or the parameter gathers and gradient reduce-scatters (FSDP2) are hidden behind compute.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fewstep.bench.step import release, setup_step, timed
from fewstep.config import RunConfig
from fewstep.contracts import DataSpec

log = logging.getLogger(__name__)


@dataclass
class ScalingResult:
    """One objective on ``world`` GPUs: median seconds per step (slowest rank) alone and wrapped, and the
    largest peak memory (GiB) of any rank in each phase. ``batch`` is per GPU."""

    objective: str
    mode: str
    world: int
    batch: int
    compiled: bool
    alone_s: float
    wrapped_s: float
    alone_peak_gib: float
    wrapped_peak_gib: float

    @property
    def efficiency(self) -> float:
        """Per-GPU throughput wrapped ÷ alone, in (0, 1] when communication costs time."""
        return self.alone_s / self.wrapped_s

    @property
    def images_per_s(self) -> float:
        """Images per second of all ranks together, wrapped."""
        return self.world * self.batch / self.wrapped_s


def _slowest(value: float, device: torch.device) -> float:
    """The maximum of ``value`` over ranks (every rank calls this, in the same order); NaN stays NaN."""
    if math.isnan(value):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def bench_scaling(cfg: RunConfig, spec: DataSpec, *, batch: int, steps: int, warmup: int, compile: bool,
                  checkpointing: bool = False, after: Callable[[nn.Module], None] | None = None) -> ScalingResult:
    """Time ``cfg.objective``'s step alone and wrapped (``cfg.train.distributed``) on every rank of the
    launched process group; ``batch`` images per GPU (per process on a CPU, where times are wall-clock
    and peaks NaN). Progress goes to this module's logger (printed on rank 0 by the CLI); ``after`` on every rank with the (unwrapped)
    objective after the wrapped steps, e.g. to check that the ranks hold the same weights."""
    from accelerate import Accelerator

    from fewstep.train.distributed import Parallel

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda,
                              mixed_precision="bf16" if (cuda and cfg.train.precision == "bf16") else "no")
    parallel = Parallel(cfg.train.distributed, accelerator)   # also destroys the group at exit
    device, rank = accelerator.device, accelerator.process_index
    name = cfg.objective.name
    setup = setup_step(cfg, spec, batch=batch, compile=compile, checkpointing=checkpointing, device=device,
                       seed=rank)
    times, alone_peak = timed(setup.step, warmup=warmup, steps=steps, name=f"{name} alone", device=device)
    alone = _slowest(statistics.median(times), device)
    alone_peak = _slowest(alone_peak, device)
    accelerator.wait_for_everyone()

    # The ranks' weights and AdamW moments drifted apart alone. Wrapping restores rank 0's weights (DDP
    # broadcasts them, FSDP2's shard() too); a fresh optimizer (over the DTensor shards under FSDP2)
    # makes the wrapped steps a synchronised training run from there.
    setup.objective = parallel.shard(setup.objective)        # FSDP2: in place; DDP: unchanged
    setup.new_optimizer(cfg)
    model, setup.optimizer = parallel.prepare(setup.objective, setup.optimizer)
    times, wrapped_peak = timed(lambda: setup.step(model), warmup=warmup, steps=steps,
                                name=f"{name} {parallel.mode}", device=device)
    if after is not None:
        after(setup.objective)
    wrapped = _slowest(statistics.median(times), device)
    wrapped_peak = _slowest(wrapped_peak, device)
    result = ScalingResult(objective=name, mode=parallel.mode, world=accelerator.num_processes, batch=batch,
                           compiled=compile, alone_s=alone, wrapped_s=wrapped, alone_peak_gib=alone_peak,
                           wrapped_peak_gib=wrapped_peak)
    del model, setup
    accelerator.free_memory()
    release()
    return result


def scaling_line(r: ScalingResult) -> str:
    """One line: the step alone and wrapped, total images/s and the scaling efficiency."""
    return (f"{r.objective:>10} {r.mode} × {r.world} GPUs, batch {r.batch}/GPU{' compiled' if r.compiled else ''}: "
            f"alone {r.alone_s:.4f} s/step ({r.alone_peak_gib:.1f} GiB), {r.mode} {r.wrapped_s:.4f} s/step "
            f"({r.wrapped_peak_gib:.1f} GiB), {r.images_per_s:.1f} img/s in all, "
            f"scaling efficiency {100 * r.efficiency:.1f}%")
