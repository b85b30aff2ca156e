"""``fewstep bench step``: full training steps of an objective against flow matching, same process.

A step is what the trainer does per batch: objective forward (with its JVPs and teacher passes) under
bf16 autocast with fp32 master weights, backward, fused AdamW, EMA and teacher updates. Data are
synthetic latents of the configured shape (ImageNet-256 SD-VAE latents, 4×32×32, 1000 classes, by
default). Per objective: median seconds per step over timed steps after warm-up (CUDA events, one sync
per step), images/s, peak memory of the step, CUDA kernels launched per step (one profiled step) and
MFU = model FLOPs per step ÷ time ÷ the GPU's dense bf16 peak, with the FLOPs counted by the objective
(:meth:`Objective.flops_per_sample`: a JVP, its backward and a teacher pass are not one forward each).
"""
from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from fewstep.backbones.inputs import trusted_labels
from fewstep.bench import cuda_times
from fewstep.build import build_objective, build_optimizer
from fewstep.config import RunConfig
from fewstep.contracts import DataSpec
from fewstep.train.status import peak_flops

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One objective's measurements (times in seconds, memory in GiB, FLOPs per step)."""

    objective: str
    batch: int
    compiled: bool
    checkpointing: bool
    s_per_step: float
    images_per_s: float
    peak_gib: float
    kernels_per_step: int | None
    flops_per_step: float
    mfu: float | None
    times: list[float] = field(default_factory=list)
    path: str = "explicit"
    tuned: bool = False
    top_kernels: list[KernelTime] = field(default_factory=list)
    kernel_ms: float | None = None
    host_ms: float | None = None

    @property
    def gpu_busy(self) -> float | None:
        """GPU kernel time of the profiled step over the median step time (one stream: kernels do not
        overlap): near 1 when the GPU bounds the step; well below when the host launching kernels does."""
        return None if self.kernel_ms is None else self.kernel_ms / (1000 * self.s_per_step)

    @property
    def best_s(self) -> float:
        """The fastest timed step (s): the floor that host jitter cannot raise, where the median
        (``s_per_step``) is what a run sees."""
        return min(self.times) if self.times else self.s_per_step


@dataclass
class KernelTime:
    """One CUDA kernel name's total in a profiled step: launches and GPU milliseconds."""

    name: str
    calls: int
    ms: float


def _profile_kernels(step) -> list[KernelTime] | None:
    """Every CUDA kernel name launched by one call of ``step`` with its launches and GPU time, longest
    first (torch.profiler); ``None`` if the profiler is unavailable (e.g. CUPTI missing)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except Exception:   # report nothing rather than fail the benchmark
        return None
    totals: dict[str, KernelTime] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = totals.setdefault(e.name, KernelTime(e.name, 0, 0.0))
            k.calls += 1
            k.ms += e.time_range.elapsed_us() / 1000
    return sorted(totals.values(), key=lambda k: -k.ms)


@dataclass
class StepSetup:
    """A built objective with its fused AdamW and one synthetic batch, ready to step.

    ``x``: (batch, C, H, W) float32 latents; ``y``: (batch,) labels or ``None``; ``bf16``: autocast on.
    """

    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor | None
    generator: torch.Generator
    bf16: bool
    functorch: bool = False

    def step(self, model: torch.nn.Module | None = None) -> None:
        """One training step: forward through ``model`` (a DDP wrapper of the objective; default the
        objective), backward, AdamW, EMA and teacher updates."""
        from fewstep.objectives.jvp import functorch_jvp

        model = self.objective if model is None else model
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.bf16), trusted_labels(), \
                functorch_jvp(self.functorch):
            out = model(self.x, self.y, self.generator)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_step()

    def new_optimizer(self, cfg: RunConfig) -> None:
        """A fresh trainer AdamW over the objective's current parameters (after FSDP2 sharding)."""
        params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg, self.x.device.type == "cuda")


def setup_step(cfg: RunConfig, spec: DataSpec, *, batch: int, compile: bool, checkpointing: bool = False,
               functorch: bool = False, device: torch.device | None = None, seed: int = 0) -> StepSetup:
    """Build ``cfg.objective`` on ``device`` (default the current GPU; a CPU works too, for tests), switch
    checkpointing and compilation as asked, and draw one batch from ``seed``."""
    from fewstep.compiling import compile_objective, set_activation_checkpointing

    device = device or torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)     # every rank builds the same weights
    started = time.perf_counter()
    with device:             # initialise on the GPU (spectral init's SVDs are slow on a CPU)
        objective = build_objective(cfg, spec)
    log.info(f"{cfg.objective.name}: built in {time.perf_counter() - started:.1f} s")
    if checkpointing:
        set_activation_checkpointing(objective, blocks=cfg.train.checkpoint_blocks)
    if compile:
        compile_objective(objective, tuning=cfg.train.compile_tuning)
    objective.train()
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, spec.channels, spec.resolution, spec.resolution, device=device, generator=generator)
    y = torch.randint(0, spec.num_classes, (batch,), device=device, generator=generator) if spec.num_classes else None
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    params = [p for p in objective.parameters() if p.requires_grad]
    return StepSetup(objective, build_optimizer(params, cfg, device.type == "cuda"), x, y, generator,
                     cfg.train.precision == "bf16", functorch)


def timed(step, *, warmup: int, steps: int, name: str, device: torch.device | None = None) -> tuple[list[float], float]:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones: (seconds of each, peak GiB
    allocated over the timed calls). On a GPU (the default) CUDA events time the calls; on a CPU the
    wall clock does and the peak is NaN."""
    cuda = device is None or device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(warmup):
        started = time.perf_counter()
        step()
        sync()
        log.info(f"{name}: warm-up step {i + 1}/{warmup} {time.perf_counter() - started:.2f} s")
    if not cuda:
        return host_seconds(step, steps, sync), math.nan
    torch.cuda.reset_peak_memory_stats()
    times = cuda_times(step, steps)
    return times, torch.cuda.max_memory_allocated() / 2**30


def release() -> None:
    """Collect dropped objectives and return cached GPU memory before the next one is built (``del``
    the references first)."""
    gc.collect()
    torch.cuda.empty_cache()


def host_seconds(step, repeats: int, sync) -> list[float]:
    """Wall-clock seconds of the host in each of ``repeats`` calls of ``step``, each started after
    ``sync()`` (waits for the device: a no-op on a CPU) and not waiting for the device at its end."""
    spent = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        step()
        spent.append(time.perf_counter() - started)
    sync()
    return spent


def host_time_ms(step, repeats: int = 5, sync=None) -> float:
    """Median host time (ms) to issue one call of ``step`` on a GPU, from an idle GPU, without waiting
    for its kernels at the end. Waiting on a full launch queue counts too, so a host time can come close
    to, but not exceed, the kernels' time (``StepResult.kernel_ms``) because of the GPU: a host time
    above it means the host bounds the step; one well below it, the GPU. ``sync``: waits for the
    device (default ``torch.cuda.synchronize``)."""
    return 1000 * statistics.median(host_seconds(step, repeats, sync or torch.cuda.synchronize))


def bench_objective(cfg: RunConfig, spec: DataSpec, *, batch: int, steps: int, warmup: int,
                    compile: bool, functorch: bool = False, checkpointing: bool = False,
                    profile_kernels: bool = True, top: int = 0, device: torch.device | None = None) -> StepResult:
    """Time ``steps`` full training steps of ``cfg.objective`` on ``cfg.backbone`` after ``warmup``
    (``functorch``: JVPs through ``torch.func.jvp`` instead of the backbone's tangent rules; ``top``: keep
    the ``top`` kernels of the profiled step by GPU time in ``StepResult.top_kernels``; ``device``: default
    the current GPU; on a CPU, for tests, times are wall-clock and no kernels are profiled)."""
    setup = setup_step(cfg, spec, batch=batch, compile=compile, checkpointing=checkpointing, functorch=functorch,
                       device=device)
    device = setup.x.device
    times, peak = timed(setup.step, warmup=warmup, steps=steps, name=cfg.objective.name, device=device)
    profiling = (profile_kernels or top) and device.type == "cuda"
    profiled = _profile_kernels(setup.step) if profiling else None
    kernels = sum(k.calls for k in profiled) if profiled is not None else None
    host = host_time_ms(setup.step) if device.type == "cuda" else None
    median = statistics.median(times)
    objective = setup.objective
    flops = objective.flops_per_sample(objective.backbone.forward_flops(1)) * batch
    peak_flops_s = peak_flops(device)
    result = StepResult(objective=cfg.objective.name, batch=batch, compiled=compile, checkpointing=checkpointing,
                        s_per_step=median,
                        images_per_s=batch / median, peak_gib=peak, kernels_per_step=kernels,
                        flops_per_step=flops, mfu=(flops / median / peak_flops_s) if peak_flops_s else None,
                        times=times, path="functorch" if functorch else "explicit",
                        tuned=compile and cfg.train.compile_tuning,
                        top_kernels=(profiled or [])[:top],
                        kernel_ms=sum(k.ms for k in profiled) if profiled is not None else None,
                        host_ms=host)
    del objective, setup
    release()
    return result


def kernel_table(result: StepResult) -> list[str]:
    """``result.top_kernels`` as lines: GPU ms per step, share of the step's median time, launches, name."""
    total = result.s_per_step * 1000
    busy = f"; all kernels {result.kernel_ms:.1f} ms" if result.kernel_ms is not None else ""
    lines = [f"top kernels of one {result.objective} step ({total:.1f} ms{busy}):"]
    for k in result.top_kernels:
        name = k.name if len(k.name) <= 90 else k.name[:87] + "..."
        lines.append(f"  {k.ms:8.2f} ms {100 * k.ms / total:5.1f}% {k.calls:6d}×  {name}")
    return lines


def summary(results: list[StepResult], baseline: StepResult | None) -> list[str]:
    """One line per objective; ratios against ``baseline`` (flow matching) when given."""
    lines = []
    for r in results:
        ratio = ""
        if baseline and r is not baseline:
            ratio = (f", {r.s_per_step / baseline.s_per_step:.2f}× {baseline.objective} "
                     f"(best to best {r.best_s / baseline.best_s:.2f}×)")
        mfu = f", MFU {100 * r.mfu:.1f}%" if r.mfu is not None else ""
        kernels = f", {r.kernels_per_step} kernels" if r.kernels_per_step is not None else ""
        if r.gpu_busy is not None:
            kernels += f" (GPU busy {100 * r.gpu_busy:.0f}%)"
        if r.host_ms is not None:
            kernels += f", host {r.host_ms:.0f} ms/step"
        jvp = " (functorch JVP)" if r.path == "functorch" else ""
        lines.append(f"{r.objective:>10}{jvp} batch {r.batch}{' compiled' if r.compiled else ''}"
                     f"{' (tuned)' if r.tuned else ''}{' checkpointed' if r.checkpointing else ''}: "
                     f"{r.s_per_step:.4f} s/step (best {r.best_s:.4f}), {r.images_per_s:.1f} img/s, "
                     f"peak {r.peak_gib:.1f} GiB"
                     f"{mfu}{kernels}{ratio}")
    return lines
