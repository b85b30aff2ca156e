"""The ``fewstep`` command line: train, sample, list."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fewstep.checkpoints import CheckpointError
from fewstep.config import ConfigError, RunConfig, apply_overrides, default_backbone_config, to_dict
from fewstep.registry import REGISTRIES, RegistryError, recipes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, sample and evaluate one- and few-step generative models.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (GPU): each prints times, TFLOP/s or images/s "
                        "and peak memory, as ratios against a baseline run in the same process.")
app.add_typer(bench_app, name="bench")
console = Console()
err = Console(stderr=True)

from fewstep.data.base import DataError

USER_ERRORS = (RegistryError, ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError, KeyError)


def _fail(exc: BaseException) -> None:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def build_config(recipe: str, objective: Optional[str], backbone: Optional[str], data: Optional[str],
                 kimg: Optional[float], batch: Optional[int], overrides: list[str]) -> RunConfig:
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
    out: Optional[Path] = typer.Option(None, help="Run directory; an existing run there is resumed. Default: runs/NNNNN-…"),
    set_: list[str] = typer.Option([], "--set", help="Override a config field: section.field=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    progress: bool = typer.Option(True, help="Show the progress bar (plain status lines otherwise)."),
) -> None:
    """Train a model; writes config.json, log.jsonl, checkpoints and sample grids to the run directory."""
    try:
        cfg = build_config(recipe, objective, backbone, data, kimg, batch, set_)
        from fewstep.build import resolve

        cfg = resolve(cfg)
        if dry_run:
            console.print_json(json.dumps(to_dict(cfg)))
            return
        from fewstep.train import train as run_training

        run_dir = out or _new_run_dir(Path("runs"), cfg)
        console.print(f"run directory: [bold]{run_dir}[/]")
        result = run_training(cfg, run_dir, show_progress=progress)
    except USER_ERRORS as exc:
        _fail(exc)
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    console.print(f"done: {result.kimg:.1f} kimg, {result.step} steps, loss {loss}; checkpoint {result.checkpoint}")


@app.command()
def sample(
    run: Path = typer.Option(..., help="Run directory (newest valid checkpoint) or one checkpoint directory."),
    nfe: str = typer.Option("1", help="Jumps per image; a comma list (1,2,4) stacks one grid block per value."),
    seeds: str = typer.Option("0-63", help="Sample seeds, e.g. 0-63 or 1,5,9; image i depends only on its seed."),
    out: Path = typer.Option(Path("grid.png"), help="Output PNG grid."),
    weights: Optional[str] = typer.Option(None, help="'online' or an EMA track name (default: the run's sample.weights)."),
    guidance: Optional[float] = typer.Option(None, help="CFG scale w (default: the objective's)."),
    class_label: Optional[int] = typer.Option(None, "--class", help="Draw every image from this class."),
    batch: int = typer.Option(64, help="Images per forward (does not change the images)."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    save_tensor: Optional[Path] = typer.Option(None, help="Also save the raw samples (safetensors)."),
) -> None:
    """Sample a trained run into a PNG grid."""
    import torch

    from fewstep.build import load_objective
    from fewstep.images import make_grid, to_uint8, write_png
    from fewstep.sample import parse_seeds, sample as run_sampler

    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        nfes = [int(v) for v in nfe.split(",")]
        seed_list = parse_seeds(seeds)
        objective, cfg, ckpt = load_objective(run, device=dev)
        weights = weights or cfg.sample.weights
        results = [run_sampler(objective, seed_list, n, weights=weights, class_label=class_label,
                               guidance=guidance, batch_size=batch, device=dev, autocast=dev.type == "cuda")
                   for n in nfes]
        if ckpt.manifest["data_spec"].get("kind") == "points":   # toy data: one scatter panel per NFE
            from fewstep.plots import scatter_png

            scatter_png(out, [r.images.flatten(1)[:, :2] for r in results])
        else:
            write_png(out, make_grid([to_uint8(r.images) for r in results]))
        if save_tensor:
            from safetensors.torch import save_file

            save_file({f"nfe{r.nfe}": r.images.contiguous() for r in results}, str(save_tensor))
    except USER_ERRORS as exc:
        _fail(exc)
    summary = ", ".join(f"{r.nfe} NFE ({r.evaluations} evaluations)" for r in results)
    console.print(f"wrote {out}: {len(seed_list)} images × [{summary}] from {ckpt.path} ({weights} weights)")


@app.command("list")
def list_(kind: Optional[str] = typer.Argument(None, help="objectives, backbones, datasets, recipes, metrics or extractors (default: all).")) -> None:
    """List registered components (with their source package), planned and unavailable ones."""
    kinds = list(REGISTRIES)
    if kind is not None and kind not in REGISTRIES:
        from fewstep.registry import closest

        hint = closest(kind, kinds)
        _fail(ValueError(f"unknown kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (valid: {', '.join(kinds)})"))
    for name in [kind] if kind else kinds:
        reg = REGISTRIES[name]
        table = Table(title=name, title_justify="left", show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("source")
        table.add_column("summary")
        for entry in reg.entries():
            table.add_row(entry.name, entry.source, entry.summary)
        for planned, why in reg.planned().items():
            table.add_row(planned, "[dim]planned[/]", f"[dim]{why}[/]")
        for broken, why in reg.unavailable().items():
            table.add_row(broken, "[red]unavailable[/]", why)
        console.print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
