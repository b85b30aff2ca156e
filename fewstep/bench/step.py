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
import statistics
import time
from dataclasses import dataclass, field

import torch

from fewstep.backbones.inputs import trusted_labels
from fewstep.bench import cuda_times
from fewstep.build import build_objective
from fewstep.config import RunConfig
from fewstep.contracts import DataSpec
from fewstep.train.status import peak_flops


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
    top_kernels: list[KernelTime] = field(default_factory=list)


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


def bench_objective(cfg: RunConfig, spec: DataSpec, *, batch: int, steps: int, warmup: int,
                    compile: bool, functorch: bool = False, checkpointing: bool = False,
                    profile_kernels: bool = True, top: int = 0, log=print) -> StepResult:
    """Time ``steps`` full training steps of ``cfg.objective`` on ``cfg.backbone`` after ``warmup``
    (``functorch``: JVPs through ``torch.func.jvp`` instead of the backbone's tangent rules; ``top``: keep
    the ``top`` kernels of the profiled step by GPU time in ``StepResult.top_kernels``)."""
    from fewstep.compiling import compile_objective, set_activation_checkpointing
    from fewstep.objectives.jvp import functorch_jvp

    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.perf_counter()
    with device:             # initialise on the GPU (spectral init's SVDs are slow on a CPU)
        objective = build_objective(cfg, spec)
    log(f"{cfg.objective.name}: built in {time.perf_counter() - started:.1f} s")
    if checkpointing:
        set_activation_checkpointing(objective)
    if compile:
        compile_objective(objective)
    objective.train()
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas, eps=cfg.train.eps,
                                  weight_decay=cfg.train.weight_decay, fused=True)
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, spec.channels, spec.resolution, spec.resolution, device=device, generator=generator)
    y = torch.randint(0, spec.num_classes, (batch,), device=device, generator=generator) if spec.num_classes else None
    bf16 = cfg.train.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), trusted_labels(), functorch_jvp(functorch):
            out = objective(x, y, generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step()

    for i in range(warmup):
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        log(f"{cfg.objective.name}: warm-up step {i + 1}/{warmup} {time.perf_counter() - started:.2f} s")
    torch.cuda.reset_peak_memory_stats()
    times = cuda_times(step, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30
    profiled = _profile_kernels(step) if profile_kernels or top else None
    kernels = sum(k.calls for k in profiled) if profiled is not None else None
    median = statistics.median(times)
    flops = objective.flops_per_sample(objective.backbone.forward_flops(1)) * batch
    peak_flops_s = peak_flops(device)
    result = StepResult(objective=cfg.objective.name, batch=batch, compiled=compile, checkpointing=checkpointing,
                        s_per_step=median,
                        images_per_s=batch / median, peak_gib=peak, kernels_per_step=kernels,
                        flops_per_step=flops, mfu=(flops / median / peak_flops_s) if peak_flops_s else None,
                        times=times, path="functorch" if functorch else "explicit",
                        top_kernels=(profiled or [])[:top])
    del objective, optimizer, params, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return result


def kernel_table(result: StepResult) -> list[str]:
    """``result.top_kernels`` as lines: GPU ms per step, share of the step's median time, launches, name."""
    total = result.s_per_step * 1000
    lines = [f"top kernels of one {result.objective} step ({total:.1f} ms):"]
    for k in result.top_kernels:
        name = k.name if len(k.name) <= 90 else k.name[:87] + "..."
        lines.append(f"  {k.ms:8.2f} ms {100 * k.ms / total:5.1f}% {k.calls:6d}×  {name}")
    return lines


def summary(results: list[StepResult], baseline: StepResult | None) -> list[str]:
    """One line per objective; ratios against ``baseline`` (flow matching) when given."""
    lines = []
    for r in results:
        ratio = f", {r.s_per_step / baseline.s_per_step:.2f}× {baseline.objective}" if baseline and r is not baseline else ""
        mfu = f", MFU {100 * r.mfu:.1f}%" if r.mfu is not None else ""
        kernels = f", {r.kernels_per_step} kernels" if r.kernels_per_step is not None else ""
        jvp = " (functorch JVP)" if r.path == "functorch" else ""
        lines.append(f"{r.objective:>10}{jvp} batch {r.batch}{' compiled' if r.compiled else ''}"
                     f"{' checkpointed' if r.checkpointing else ''}: "
                     f"{r.s_per_step:.4f} s/step, {r.images_per_s:.1f} img/s, peak {r.peak_gib:.1f} GiB"
                     f"{mfu}{kernels}{ratio}")
    return lines
