"""What a run needs from the machine, checked before anything large is allocated: memory and CPU threads.

**Memory (CPU runs).** A GPU recipe started on a CPU (``fewstep train --objective tvm --backbone dit-xl``)
used to be killed by the kernel for memory with no message. :func:`estimate_memory` measures what one
training step keeps, without allocating it: the objective is built on the ``meta`` device and its
forward runs on fake tensors (``torch._subclasses.FakeTensorMode``) for one and two samples, while a
saved-tensor hook adds up what autograd keeps for backward (each storage once, parameters excluded).
An objective whose step branches on tensor values (ECT tests whether a whole batch is at the boundary)
cannot run on fake tensors; then one forward of its backbone with gradients is measured, the least any
objective keeps. With the fp32 weights of every copy (online net, EMA tracks, teacher), the gradients
and AdamW's two moments, that is a lower bound of the step's peak (the measured CPU peaks above it are
in docs/speed.md, "CPU memory"), so a run is refused when even the lower bound does not fit, and warned
about when twice the activations would not.

**Threads (CPU runs).** PyTorch's default of one OpenMP thread per core is fastest on an idle machine
and much slower on a busy one, where threads that wait for a descheduled sibling spin (docs/speed.md,
"CPU threads"). ``train.cpu_threads`` sets the count; ``None`` (auto) honours ``OMP_NUM_THREADS`` when it
is set, and otherwise takes the cores this process may use, less the load average of other work, split
over this host's processes (at least one). A matmul's rounding depends on how many threads split it, so
checkpoints record the count and a resumed run uses it again (bit-exact resumption on CPU); runs compared
bit for bit need the same count.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from fewstep.config import ConfigError, RunConfig
from fewstep.files import size_text

log = logging.getLogger(__name__)

# Smaller models are not measured (their step fits any machine at any sensible batch; the smallest GPU
# recipe's DiT-S/2 is several times larger): it saves the fake forward, and keeps tests that count forward
# calls exact.
MEASURE_ABOVE = 5_000_000   # trainable parameters
CPU_RECIPES = "--recipe smoke (Fashion-MNIST, a few minutes) or --recipe toy2d (2-D points, about a minute)"


@dataclass
class MemoryEstimate:
    """Bytes one training process keeps at the peak of a step, measured without allocating it.

    Attributes:
        parameters: parameters of the objective (online net, EMA tracks, teacher).
        trainable: those the optimizer updates.
        state_bytes: fp32 weights of all, gradients and the two AdamW moments of the trainable ones.
        activation_bytes_per_sample: what autograd keeps for backward per training sample, or ``None``
            when the fake forward could not run (an objective with data-dependent Python control flow).
        fixed_activation_bytes: what it keeps whatever the batch.
        batch_per_gpu: samples per forward.
        whole_step: the activations are the objective's whole forward (``False``: one backbone forward
            with gradients, the least any objective keeps, where the step could not run on fake tensors).
    """

    parameters: int
    trainable: int
    state_bytes: int
    activation_bytes_per_sample: int | None
    fixed_activation_bytes: int
    batch_per_gpu: int
    whole_step: bool = True

    def total(self, batch_per_gpu: int | None = None, activation_factor: float = 1.0) -> int:
        """Lower bound (``activation_factor`` 1) of the step's peak at ``batch_per_gpu`` samples per forward."""
        per = self.activation_bytes_per_sample or 0
        n = self.batch_per_gpu if batch_per_gpu is None else batch_per_gpu
        return self.state_bytes + int(activation_factor * (self.fixed_activation_bytes + per * n))

    def describe(self) -> str:
        """``2.03 B parameters (678 M trained): 16.3 GiB for weights, gradients and AdamW; 1.8 GiB of
        activations per image × 32 images``."""
        text = (f"{_count(self.parameters)} parameters ({_count(self.trainable)} trained): "
                f"{size_text(self.state_bytes)} for weights, gradients and AdamW")
        if self.activation_bytes_per_sample:
            text += (f"; {size_text(self.activation_bytes_per_sample)} of activations per image × "
                     f"{self.batch_per_gpu} images per forward")
            if not self.whole_step:
                text += " (one backbone forward's, the least any objective keeps)"
        return text


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n:,}"


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's ``MemAvailable``, capped by the cgroup's limit
    (containers, Slurm jobs); ``None`` where neither can be read (not Linux)."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:   # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def estimate_memory(cfg: RunConfig, dataset: Any, batch_per_gpu: int, measure_above: int = MEASURE_ABOVE
                    ) -> MemoryEstimate:
    """Measure a training step of ``cfg`` on ``dataset``'s items without allocating it (module docstring);
    activations only for models of more than ``measure_above`` trainable parameters."""
    from fewstep.build import build_objective

    with torch.device("meta"):
        objective = build_objective(cfg, dataset.spec)
    params = list(objective.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    state = 4 * (n_all + 3 * n_train)   # fp32 weights of every copy + gradient + AdamW exp_avg, exp_avg_sq
    if n_train <= measure_above:
        return MemoryEstimate(n_all, n_train, state, None, 0, batch_per_gpu)
    try:
        (one, two), whole_step = kept_bytes(objective, dataset, (1, 2))
    except Exception as exc:   # a plugin backbone that fake tensors cannot run: weights and optimizer only
        log.warning("the activation memory of this run could not be measured (%s); only weights and optimizer "
                    "state are counted", exc)
        return MemoryEstimate(n_all, n_train, state, None, 0, batch_per_gpu, False)
    return MemoryEstimate(n_all, n_train, state, max(two - one, 0), max(2 * one - two, 0), batch_per_gpu, whole_step)


def kept_bytes(objective: torch.nn.Module, dataset: Any, batches: tuple[int, ...]) -> tuple[list[int], bool]:
    """Bytes autograd saves for backward (each storage once, parameters and buffers excluded) in a training
    forward of ``objective`` (built on the ``meta`` device) for each of ``batches`` copies of ``dataset[0]``,
    run on fake tensors. Graphs an objective builds and drops within its forward count too, so this
    can exceed what is held at the end of the forward. Returns them and whether they are the whole step's (``False``: one backbone
    forward's, where the step branches on tensor values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fewstep.backbones.inputs import trusted_labels

    x0, y0 = dataset[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = objective.to_empty(device="cpu")
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        weights |= {b.untyped_storage()._cdata for b in model.buffers()}

        def kept(batch: int, whole_step: bool) -> int:
            seen, total, alive = set(weights), 0, []

            def pack(t: torch.Tensor) -> torch.Tensor:
                nonlocal total
                storage = t.untyped_storage()
                if storage._cdata not in seen:
                    seen.add(storage._cdata)
                    alive.append(t)   # no storage is freed and its address reused during the count
                    total += storage.nbytes()
                return t

            x = x0.unsqueeze(0).expand(batch, *x0.shape).contiguous()
            y = torch.as_tensor(y0).reshape(1).expand(batch).contiguous() if dataset.spec.num_classes else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trusted_labels():
                if whole_step:
                    model(x, y, torch.Generator().manual_seed(0), 0)
                else:   # one forward of the backbone with gradients: what any objective keeps at least
                    t = torch.full((batch,), 0.5)
                    needs = model.needs
                    model.backbone(x, t, t * 0.5 if needs.time_inputs == 2 else None, y,
                                   **({"guidance": t} if needs.guidance_input else {}))
            return total

        try:
            return [kept(b, True) for b in batches], True
        except Exception as exc:   # data-dependent Python control flow (ECT's all-boundary test) …
            log.debug("the objective's step cannot run on fake tensors (%s): measuring one backbone forward", exc)
            return [kept(b, False) for b in batches], False


def check_memory(cfg: RunConfig, dataset: Any, batch_per_gpu: int, device: torch.device, processes: int = 1,
                 available: int | None = None, measure_above: int = MEASURE_ABOVE) -> MemoryEstimate | None:
    """Refuse a CPU run whose step cannot fit in memory, with one line saying what it needs and what to run
    instead; warn when it may not fit. GPU runs are not checked (``None``).

    Args:
        processes: training processes sharing this machine's memory (CPU ranks, parallel sweep members).
        available: bytes available (default: :func:`available_memory`).
    """
    if device.type != "cpu":
        return None
    available = available_memory() if available is None else available
    if available is None:
        return None
    est = estimate_memory(cfg, dataset, batch_per_gpu, measure_above)
    need = processes * est.total()
    shared = f" for each of {processes} processes" if processes > 1 else ""
    if need > available:
        fits = _fitting_batch(est, cfg.train.batch, available // processes)
        smaller = (f", or set train.batch_per_gpu={fits} (gradient accumulation keeps the global batch)" if fits
                   else "")
        raise ConfigError(
            f"this run needs at least {size_text(need)} of memory on the CPU ({est.describe()}{shared}) and "
            f"{size_text(available)} are available: run recipe {cfg.recipe!r} with {cfg.backbone.name} on a GPU; "
            f"on a CPU use {CPU_RECIPES}{smaller}")
    if processes * est.total(activation_factor=2.0) > 0.9 * available:
        log.warning("this run may not fit in memory: it needs %s to %s on the CPU (%s%s) and %s are available",
                    size_text(need), size_text(processes * est.total(activation_factor=2.0)), est.describe(),
                    shared, size_text(available))
    return est


def check_memory_on_all_ranks(cfg: RunConfig, dataset: Any, batch_per_gpu: int, accelerator: Any) -> None:
    """:func:`check_memory` on the main process, its verdict shared so every rank refuses together."""
    refusal = None
    if accelerator.is_main_process:
        try:
            check_memory(cfg, dataset, batch_per_gpu, accelerator.device, processes=local_processes())
        except ConfigError as exc:
            refusal = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise ConfigError(refusal)


def _fitting_batch(est: MemoryEstimate, batch: int, available: int) -> int | None:
    """The largest micro-batch dividing ``batch`` whose step fits in ``available`` bytes (with the measured
    2× margin over the kept activations), or ``None``."""
    fits = [n for n in range(1, batch + 1) if batch % n == 0 and est.total(n, activation_factor=2.0) <= available]
    return max(fits) if fits and est.activation_bytes_per_sample else None


def local_processes() -> int:
    """Training processes on this host (``LOCAL_WORLD_SIZE`` under torchrun / accelerate launch, else 1)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def auto_threads(processes_here: int = 1) -> int:
    """Threads for one of ``processes_here`` training processes on this host (module docstring)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, int(cores - busy + 0.5) // max(processes_here, 1))


@contextlib.contextmanager
def cpu_threads(threads: int | None, device: torch.device, processes_here: int = 1) -> Iterator[int | None]:
    """Set PyTorch's intra-op threads for a CPU run (``train.cpu_threads``; ``None``: auto, or
    ``OMP_NUM_THREADS`` when set) and restore the previous count afterwards. GPU runs are left alone."""
    if device.type != "cpu" or (threads is None and os.environ.get("OMP_NUM_THREADS")):
        yield None
        return
    previous = torch.get_num_threads()
    chosen = threads if threads is not None else auto_threads(processes_here)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)
