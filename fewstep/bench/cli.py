"""``fewstep bench …``: benchmarks that time fewstep against a baseline run in the same process.

* ``attention``: the Triton JVP-attention kernels against PyTorch (GPU).
* ``step``: full training steps of an objective against flow matching; under torchrun or accelerate
  launch, data-parallel scaling (GPU).
* ``sample``: few-step sampling against a bare backbone forward (GPU).
* ``fid``: generate + Inception features + FID, fewstep against clean-fid.
* ``data``: loader throughput, and how long a step of a given length waits for data (CPU too).

Each prints its numbers and writes them as JSON with ``--out`` (the device and the torch and triton
versions first). The benchmark implementations (``fewstep.bench.*``) are imported when their command
runs: they pull in Triton and CUDA-only code that ``fewstep --help`` on a CPU machine must not need.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import typer

from fewstep.build import build_config, resolve
from fewstep.cli_common import USER_ERRORS, console, fail, rank_and_world, write_json_out
from fewstep.clihelp import FewstepGroup
from fewstep.config import ConfigError, RunConfig
from fewstep.contracts import DataSpec
from fewstep.sample import parse_nfes
from fewstep.train.status import versions

bench_app = typer.Typer(no_args_is_help=True, cls=FewstepGroup, help="Benchmarks (GPU): each prints times, "
                        "TFLOP/s or images/s and peak memory, as ratios against a baseline run in the same process.")


def write_bench_json(path: Optional[Path], body: dict, default=None) -> None:
    """A benchmark's measurements as JSON (see :func:`~fewstep.cli_common.write_json_out`), after the GPU's name
    and the torch and triton versions they were taken with."""
    if path is None:
        return
    write_json_out(path, {"device": torch.cuda.get_device_name(), **versions(), **body}, default=default)


@bench_app.command("attention")
def bench_attention(
    shapes: str = typer.Option("all", help="Shape set: dit (DiT-XL/2 at 256 and 512 px), long (N 4k–16k) or all."),
    dtype: str = typer.Option("bf16", help="Operand dtype: bf16, fp16 or fp32."),
    reps: int = typer.Option(100, help="Timing window per measurement in ms (triton.testing.do_bench rep)."),
    out: Optional[Path] = typer.Option(None, help="Also write the measurements as JSON here."),
) -> None:
    """Triton JVP flash attention vs PyTorch (math-SDPA JVP, flash SDPA primal) on the GPU: forward,
    backward (both / gT only / gO only), whole step, the torch.func.jvp path; ms, TFLOP/s, memory, errors."""
    from fewstep.bench.attention import SHAPE_SETS, bench_shape, kernel_resources, summary_lines

    if not torch.cuda.is_available():
        fail(ValueError("fewstep bench attention needs a CUDA GPU (the kernels are tested on CPU by pytest)"))
    if shapes not in SHAPE_SETS:
        fail(ValueError(f"unknown shape set {shapes!r} (valid: {', '.join(SHAPE_SETS)})"))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        fail(ValueError(f"unknown dtype {dtype!r} (valid: {', '.join(dtypes)})"))
    import triton

    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · {dtype}")
    rows = []
    for shape in SHAPE_SETS[shapes]:
        rows.append(bench_shape(shape, dtypes[dtype], reps=reps))
        console.print(summary_lines(rows[-1:])[0], highlight=False, soft_wrap=True)
    resources = kernel_resources()
    for name, info in resources.items():
        console.print(f"{name}: {info['regs']} registers, {info['spills']} spills, {info['config']}", highlight=False)
    write_bench_json(out, {"dtype": dtype, "kernels": resources, "rows": [vars(r) for r in rows]}, default=str)


@bench_app.command("step")
def bench_step(
    objective: str = typer.Option("tvm", help="Objective to time."),
    backbone: str = typer.Option("dit-xl", help="Backbone flavour (the recipe's architecture switches are kept)."),
    recipe: str = typer.Option("imagenet-256-tvm-w2", help="Recipe giving architecture, precision and optimizer."),
    batch: int = typer.Option(32, help="Images per step (one GPU)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbones' blocks (regional)."),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="Activation checkpointing of every block "
                                       "(of the first N with --set train.checkpoint_blocks=N)."),
    jvp: str = typer.Option("explicit", help="JVP path: explicit (the backbone's own tangent rules) or "
                            "functorch (torch.func.jvp, as the official code)."),
    baseline: str = typer.Option("fm", help="Objective timed in the same process for the ratio ('none': skip; "
                                 "several processes time the objective alone and wrapped instead)."),
    channels: int = typer.Option(4, help="Synthetic data channels (ImageNet-256 SD-VAE latents: 4)."),
    resolution: int = typer.Option(32, help="Synthetic data side (ImageNet-256 latents: 32)."),
    classes: int = typer.Option(1000, help="Number of classes of the synthetic labels."),
    steps: int = typer.Option(20, help="Timed steps (median and best reported)."),
    warmup: int = typer.Option(3, help="Untimed steps first (compilation, autotuning, allocator)."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (repeatable)."),
    profile: int = typer.Option(0, help="Also list the N CUDA kernels with the most GPU time in one step."),
    out: Optional[Path] = typer.Option(None, help="Also write the measurements as JSON here."),
) -> None:
    """Full training steps (forward, JVP, backward, AdamW, EMA updates) on synthetic data: median
    s/step, images/s, peak memory, kernels/step and MFU, with the baseline's in the same process.

    Under torchrun or accelerate launch (several processes) it measures data-parallel scaling instead:
    the objective's step alone on every GPU, then wrapped as training wraps it (train.distributed: ddp
    or fsdp2, via --set), --batch images per GPU; efficiency = time alone / time wrapped."""
    from fewstep.bench.step import bench_objective, kernel_table, summary

    try:   # the arguments first, so that mistakes show on any machine
        spec = DataSpec(name="synthetic", channels=channels, resolution=resolution, num_classes=classes,
                        num_items=batch, kind="latents")
        if jvp not in ("explicit", "functorch"):
            raise ValueError(f"--jvp must be explicit or functorch, got {jvp!r}")
        names = [objective] + ([baseline] if baseline not in ("none", objective) else [])
        configs = [resolve(build_config(recipe, name, backbone, None, None, None, set_)) for name in names]
        compile = compile or configs[0].train.compile
        if configs[0].train.compile_tuning and not compile:
            raise ConfigError("train.compile_tuning tunes the kernels torch.compile generates: add --compile")
    except USER_ERRORS as exc:
        fail(exc)
    if not torch.cuda.is_available():
        fail(ValueError("fewstep bench step needs a CUDA GPU"))
    import triton

    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
                  f"{configs[0].backbone.name} · batch {batch} · {configs[0].train.precision}", highlight=False)
    checkpointing = checkpointing or configs[0].train.activation_checkpointing   # the flag, or --set
    if rank_and_world()[1] > 1:   # torchrun / accelerate launch: data-parallel scaling
        _bench_scaling(configs[0], spec, batch, steps, warmup, compile, checkpointing, out)
        return
    results = []
    for cfg in configs:
        results.append(bench_objective(cfg, spec, batch=batch, steps=steps, warmup=warmup, compile=compile,
                                       functorch=jvp == "functorch", checkpointing=checkpointing, top=profile))
        console.print(summary(results[-1:], None)[0], highlight=False)
        for line in kernel_table(results[-1]) if profile else []:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    base = results[1] if len(results) > 1 else None
    for line in summary(results, base):
        console.print(line, highlight=False)
    write_bench_json(out, {"batch": batch, "compile": compile, "jvp": jvp,
                            "backbone": dataclasses.asdict(configs[0].backbone),
                            "results": [dataclasses.asdict(r) for r in results]})


def _bench_scaling(cfg: RunConfig, spec, batch: int, steps: int, warmup: int, compile: bool, checkpointing: bool,
                   out: Optional[Path]) -> None:
    """``bench step`` under several processes: the objective alone and wrapped on every rank."""
    from fewstep.bench.scaling import bench_scaling, scaling_line

    main = rank_and_world()[0] == 0
    say = (lambda m: console.print(m, highlight=False)) if main else (lambda m: None)
    r = bench_scaling(cfg, spec, batch=batch, steps=steps, warmup=warmup, compile=compile,
                      checkpointing=checkpointing)
    say(scaling_line(r))
    if main:
        write_bench_json(out, {"world": r.world, "batch_per_gpu": batch, "compile": compile,
                                "results": [{**dataclasses.asdict(r), "efficiency": r.efficiency,
                                             "images_per_s": r.images_per_s}]})


@bench_app.command("sample")
def bench_sample(
    objective: str = typer.Option("tvm", help="Objective whose sampler is timed."),
    backbone: str = typer.Option("dit-xl", help="Backbone flavour."),
    recipe: str = typer.Option("imagenet-256-tvm-w2", help="Recipe giving the architecture."),
    nfe: str = typer.Option("1,2,4", help="Comma-separated numbers of steps."),
    batch: int = typer.Option(64, help="Images per batch."),
    modes: str = typer.Option("eager,compile,graphs", help="Comma-separated: eager, compile, graphs (CUDA graphs)."),
    channels: int = typer.Option(4, help="Data channels (ImageNet-256 latents: 4)."),
    resolution: int = typer.Option(32, help="Data side (ImageNet-256 latents: 32)."),
    classes: int = typer.Option(1000, help="Number of classes."),
    reps: int = typer.Option(20, help="Timed repetitions (median reported)."),
    out: Optional[Path] = typer.Option(None, help="Also write the measurements as JSON here."),
) -> None:
    """Few-step sampling images/s against a bare backbone forward at the same batch, per mode."""
    from fewstep.bench.sampling import MODES, bench_sampling, summary

    if not torch.cuda.is_available():
        fail(ValueError("fewstep bench sample needs a CUDA GPU"))
    try:
        nfes = parse_nfes(nfe)
        mode_list = [m.strip() for m in modes.split(",")]
        bad = [m for m in mode_list if m not in MODES]
        if bad or any(k < 1 for k in nfes):
            raise ValueError(f"modes must be among {', '.join(MODES)} and NFEs ≥ 1, got {modes!r}, {nfe!r}")
        cfg = build_config(recipe, objective, backbone, None, None, None, [])
        spec = DataSpec(name="synthetic", channels=channels, resolution=resolution, num_classes=classes,
                        num_items=batch, kind="latents")
    except USER_ERRORS as exc:
        fail(exc)
    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {cfg.backbone.name} · {objective} "
                  f"· batch {batch} · bf16", highlight=False)
    rows = bench_sampling(cfg, spec, batch=batch, nfes=nfes, modes=mode_list, reps=reps)
    for line in summary(rows):
        console.print(line, highlight=False)
    write_bench_json(out, {"batch": batch, "objective": objective, "rows": [dataclasses.asdict(r) for r in rows]})


@bench_app.command("fid")
def bench_fid(
    num: int = typer.Option(10000, help="Images timed on each path."),
    batch: int = typer.Option(256, help="Images per generator/extractor call."),
    nfe: int = typer.Option(1, help="Sampler jumps."),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights file."),
    extractor: str = typer.Option("inception", help="'inception', or 'random-inception' (torchvision "
                                  "Inception-v3, random weights: a timing stand-in when the file is missing)."),
    backbone: str = typer.Option("dit-b", help="Backbone flavour of the randomly initialised model."),
    resolution: int = typer.Option(32, help="Image side of that model (3 channels, patch 2)."),
    run: Optional[Path] = typer.Option(None, help="Use a trained run instead of a random model."),
    ref_num: Optional[int] = typer.Option(None, help="Images for the reference statistics (default: NUM)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    cleanfid: bool = typer.Option(True, help="Also time clean-fid's compute_fid(gen=...) when it is installed."),
    out: Optional[Path] = typer.Option(None, help="Also write the numbers as JSON."),
) -> None:
    """Images/s of generate + Inception features + FID, fewstep vs clean-fid on the same images."""
    from fewstep.bench.fid import bench_fid as run_bench

    try:
        result = run_bench(num=num, batch=batch, nfe=nfe, inception=inception, extractor=extractor,
                           backbone=backbone, resolution=resolution, run=str(run) if run else None,
                           ref_num=ref_num, device=device, cleanfid=cleanfid)
    except USER_ERRORS as exc:
        fail(exc)
    write_json_out(out, result)


@bench_app.command("data")
def bench_data(
    data: str = typer.Option("fashion-mnist", help="Dataset: a registered name, imagefolder:PATH, hub:NAME or latents:DIR."),
    root: Optional[str] = typer.Option(None, help="Directory holding the dataset's files (data.root)."),
    resolution: Optional[int] = typer.Option(None, help="Centre-crop and resize to this size (folders, hub)."),
    split: str = typer.Option("train", help="Dataset split."),
    batch: int = typer.Option(256, help="Images per batch (per process, as batch_per_gpu)."),
    steps: int = typer.Option(50, help="Batches timed per setting."),
    warmup: int = typer.Option(5, help="Batches before timing (workers start, caches fill)."),
    workers: str = typer.Option("0", help="Comma list of DataLoader worker counts to try (image folders, hub)."),
    prefetch: str = typer.Option("0,2", help="Comma list of prefetch depths (batches prepared ahead)."),
    pin_memory: Optional[bool] = typer.Option(None, "--pin-memory/--no-pin-memory", help="Pinned host batches (default: on CUDA)."),
    step_ms: float = typer.Option(0.0, help="Simulated training step in ms: also report how long each step waits for data."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    out: Optional[Path] = typer.Option(None, help="Also write the numbers as JSON."),
) -> None:
    """Loader throughput (batches/s, images/s) per workers/prefetch/pin-memory setting, and the wait per step
    against a given step time: does data loading stall the GPU? Runs on CPU too (host side only)."""
    from fewstep.bench.data import bench_data as run_bench
    from fewstep.config import DataConfig
    from fewstep.data import load_dataset

    try:
        dataset = load_dataset(DataConfig(name=data, root=root, split=split, resolution=resolution))
        result = run_bench(dataset, batch=batch, steps=steps, warmup=warmup,
                           workers=[int(v) for v in workers.split(",")], prefetch=[int(v) for v in prefetch.split(",")],
                           pin_memory=pin_memory, device=device, step_ms=step_ms)
    except USER_ERRORS as exc:
        fail(exc)
    write_json_out(out, result)
