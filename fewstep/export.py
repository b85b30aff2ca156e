"""``fewstep export``: an inference-only model from a run, to hand to someone else or push to the Hub.

An exported model is a directory with

* ``model.safetensors``: the one set of weights sampling needs (the chosen EMA track, or the online
  weights), with the backbone's own tensor names; no optimizer, teacher, other tracks or RNG states;
* ``config.json``: ``{"format": "fewstep-model", "version": 1, ...}``: the run's resolved config (with
  ``sample.weights`` set to the exported track), its data spec, which weights these are, the step and
  images seen, the source run, the parameter count and the SHA-256 and size of ``model.safetensors``;
* ``README.md``: a model card (objective, backbone, data, images seen, parameters, the run's evaluation
  table when there is one, how to sample) and ``samples.png``, a grid drawn from the exported weights.

:func:`fewstep.load`, ``fewstep sample --run`` and ``fewstep eval --run`` accept it like a run directory
(:func:`fewstep.build.load_objective` dispatches here). ``--push-to-hub REPO`` uploads the directory
with ``huggingface_hub``; with the Hub switched off (``HF_HUB_OFFLINE=1``) it fails before any work.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fewstep.checkpoints import Checkpoint, CheckpointError
from fewstep.files import sha256_of, write_atomic, write_json

log = logging.getLogger(__name__)

FORMAT = "fewstep-model"
VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
GRID_FILE = "samples.png"


def _read_body(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("format") == FORMAT else None


def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model written by :func:`export_model` (its ``config.json`` says so)."""
    return Path(path).is_dir() and _read_body(Path(path)) is not None


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu", weights: str | None = None
                  ) -> tuple[Any, Any, Checkpoint]:
    """(objective, run config, ``Checkpoint(path, config.json body)``) of an exported model.

    The objective is built on the ``meta`` device and only the exported network is materialised on
    ``device`` and loaded (after its SHA-256 is checked), so teachers and other tracks cost nothing.
    """
    from safetensors.torch import load_file

    from fewstep.build import build_objective, spec_from_dict
    from fewstep.config import run_config_from_dict

    path = Path(path)
    body = _read_body(path)
    if body is None or body.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a fewstep model of version {VERSION}")
    exported = body["weights"]
    if weights is not None and weights != exported:
        raise CheckpointError(f"{path} is an exported model holding only its {exported!r} weights, not {weights!r}; "
                              f"sample with --weights {exported}, or export the run again with --weights {weights}")
    file, info = path / MODEL_FILE, body["files"][MODEL_FILE]
    if not file.is_file() or file.stat().st_size != info["bytes"] or sha256_of(file) != info["sha256"]:
        raise CheckpointError(f"{file} is missing or corrupted (its size or SHA-256 does not match {path / CONFIG_FILE})")
    cfg = run_config_from_dict(body["config"])
    spec = spec_from_dict(body["data_spec"])
    tracks = {} if exported == "online" else {exported: 0.0}
    build_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, ema_betas=tracks, ema_halflife_kimg={}, ema_power_std={}))
    with torch.device("meta"):
        objective = build_objective(build_cfg, spec)
    net = objective.sampling_net(exported).to_empty(device=device)
    state = load_file(file)
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match its config: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}")
    net.load_state_dict(state)
    return objective.eval(), cfg, Checkpoint(path, body)


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------
def check_hub(repo: str) -> None:
    """Fail at once when a push cannot work: the Hub switched off, or ``huggingface_hub`` missing."""
    from fewstep.data.hf import hub_offline

    if hub_offline():
        raise ValueError(f"--push-to-hub {repo} needs the Hugging Face Hub, but it is switched off "
                         "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); unset it and log in with `hf auth login`, "
                         "or export without --push-to-hub and upload the directory later")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--push-to-hub needs huggingface_hub ({exc}): pip install huggingface_hub") from exc


def push_to_hub(folder: str | os.PathLike, repo: str, private: bool = False) -> str:
    """Upload an exported model directory to the Hub model repo ``repo`` (created if needed); its URL."""
    check_hub(repo)
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      commit_message="Upload fewstep model")
    return str(url)


def evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluation records, newest kind first: ``fid.json`` (``fewstep eval``), ``metrics.json``
    (toy data), or a sweep member's ``eval.json``. Each: metric name, NFE → value, samples, step, note."""
    out = []
    fid = _json(run_dir / "fid.json")
    if fid and isinstance(fid.get("fid"), dict):
        name = (fid.get("extractor") or {}).get("extractor", "inception")
        out.append({"metric": "FID" if name == "inception" else f"FD-{name}", "scores": fid["fid"],
                    "num": fid.get("num"), "step": (fid.get("checkpoint") or {}).get("step"),
                    "weights": fid.get("weights"), "note": f"against {fid.get('dataset', 'the data')}"})
    points = _json(run_dir / "metrics.json")
    if points and isinstance(points.get("sliced_wasserstein"), dict):
        out.append({"metric": "SW2", "scores": points["sliced_wasserstein"], "num": points.get("num"),
                    "step": None, "weights": points.get("weights"),
                    "note": f"to held-out points; noise floor {points.get('test_reference_floor', float('nan')):.4g}"})
    sweep = _json(run_dir / "eval.json")
    if sweep and not out and isinstance(sweep.get("scores"), dict):
        out.append({"metric": sweep.get("metric", "?"), "scores": sweep["scores"], "num": sweep.get("num"),
                    "step": sweep.get("checkpoint_step"), "weights": None, "note": "sweep evaluation"})
    return out


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def export_model(run: str | os.PathLike, out: str | os.PathLike, weights: str | None = "ema", grid: int = 16,
                 device: torch.device | str | None = None) -> Path:
    """Write an exported model of ``run`` (a run or checkpoint directory) into ``out``.

    Args:
        weights: ``online`` or an EMA track (``None``: the run's ``sample.weights``).
        grid: images per NFE in ``samples.png`` (0: no grid).
        device: where the sample grid is drawn (default: CUDA when present).
    Returns:
        ``out``.
    """
    from safetensors.torch import save_file

    from fewstep import __version__
    from fewstep.build import find_checkpoint, spec_from_dict
    from fewstep.config import run_config_from_dict, to_dict
    from fewstep.model import describe, load
    from fewstep.ema import ema_tracks

    ckpt = find_checkpoint(run)
    cfg = run_config_from_dict(ckpt.field("config"))
    weights = weights or cfg.sample.weights
    valid = ["online", *ema_tracks(cfg.train)]
    if weights not in valid:
        raise ValueError(f"the run has no weights named {weights!r} (valid: {', '.join(valid)})")
    out = Path(out)
    if out.resolve() == ckpt.path.parent.resolve() or out.resolve() == ckpt.path.resolve():
        raise ValueError(f"--out {out} is the run itself; export into a new directory")
    tensors = ckpt.tensors("objective.safetensors", "backbone." if weights == "online" else f"ema.{weights}.")
    write_atomic(out / MODEL_FILE, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                         metadata={"format": FORMAT}))
    config = to_dict(cfg)
    config["sample"]["weights"] = weights
    body = {"format": FORMAT, "version": VERSION, "weights": weights, "step": ckpt.step,
            "kimg": ckpt.manifest.get("kimg"), "nimg": ckpt.manifest.get("nimg"), "config": config,
            "data_spec": ckpt.field("data_spec"),
            "source": {"run": ckpt.path.parent.name, "checkpoint": ckpt.path.name},   # names only: no local paths
            "parameters": sum(t.numel() for t in tensors.values()), "fewstep_version": __version__,
            "torch_version": torch.__version__,
            "files": {MODEL_FILE: {"sha256": sha256_of(out / MODEL_FILE), "bytes": (out / MODEL_FILE).stat().st_size}}}
    write_json(out / CONFIG_FILE, body)

    model = load(out, weights=weights, device=device)   # the round trip, and the grid from the exported weights
    grid_file = _write_samples(model, out / GRID_FILE, grid) if grid > 0 else None
    facts = describe(model)
    card = model_card(facts, body, evaluations(ckpt.path.parent), grid_file, spec_from_dict(body["data_spec"]))
    write_atomic(out / CARD_FILE, card)
    log.info(f"exported {weights} weights of {ckpt.path} ({facts['parameters']:,} parameters) to {out}")
    return out


def _write_samples(model: Any, path: Path, count: int) -> Path | None:
    """``samples.png``: ``count`` seeds at each of the run's sample NFEs; ``None`` when it cannot be drawn
    (no matplotlib for point data, no VAE offline for latents): the card then says so."""
    from fewstep.data.base import DataError
    from fewstep.plots import PlotsUnavailable, scatter_png, step_label, write_grid

    nfes, seeds = list(model.config.sample.nfe), list(range(count))
    try:
        if model.spec.kind == "points":
            sets = [model.sample(seeds, n)[:, :2] for n in nfes]
            scatter_png(path, sets, [step_label(n) for n in nfes], title=f"{count} samples per panel")
        else:
            blocks = [model.sample(seeds, n) for n in nfes]
            write_grid(path, blocks, [step_label(n) for n in nfes],
                       title=f"seeds 0–{count - 1}, {model.weights} weights")
    except (PlotsUnavailable, DataError, OSError) as exc:
        log.warning(f"no sample grid in the export: {exc}")
        return None
    return path


def model_card(facts: dict[str, Any], body: dict[str, Any], evals: list[dict[str, Any]], grid: Path | None,
               spec: Any) -> str:
    """The exported model's ``README.md`` (with Hugging Face Hub metadata in front)."""
    kimg = facts["kimg"]
    images = f"{int(round(kimg * 1000)):,} images ({kimg:g} kimg, {facts['step']:,} optimizer steps)" \
        if kimg is not None else f"{facts['step']:,} optimizer steps"
    data = (f"{spec.channels}×{spec.resolution}×{spec.resolution} {spec.kind}" if spec.kind != "points"
            else f"{spec.channels}-D points")
    classes = f", {spec.num_classes} classes" if spec.num_classes else ", unconditional"
    lines = ["---", "library_name: fewstep", "tags:", "- fewstep", f"- {facts['objective']}",
             "- few-step-generation", "---", "",
             f"# {facts['objective']} · {facts['backbone']} · {facts['data']}", "",
             f"A few-step generative model trained with fewstep (recipe `{facts['recipe']}`), exported for "
             "sampling only: `model.safetensors` holds one set of network weights, `config.json` the run's "
             "resolved configuration.", "",
             "| | |", "|---|---|",
             f"| objective | `{facts['objective']}` |",
             f"| backbone | `{facts['backbone']}` |",
             f"| data | `{facts['data']}` ({data}{classes}) |",
             f"| images seen | {images} |",
             f"| parameters | {facts['parameters']:,} |",
             f"| weights | `{facts['weights']}` |",
             f"| exported from | `{body['source']['run']}` ({body['source']['checkpoint']}) |",
             f"| fewstep | {body['fewstep_version']} (torch {body['torch_version']}) |", ""]
    if evals:
        nfes = sorted({int(k) for e in evals for k in e["scores"]})
        lines += ["## Evaluation", "", "| metric | " + " | ".join(f"{n} NFE" for n in nfes) + " | samples | notes |",
                  "|---|" + "---:|" * len(nfes) + "---:|---|"]
        for e in evals:
            cells = [f"{e['scores'][str(n)]:.4g}" if str(n) in e["scores"] else "–" for n in nfes]
            note = e["note"]
            if e.get("step") is not None and e["step"] != facts["step"]:
                note += f"; measured at step {e['step']}, not the exported step {facts['step']}"
            if e.get("weights") and e["weights"] != facts["weights"]:
                note += f"; with the {e['weights']} weights"
            lines.append(f"| {e['metric']} | " + " | ".join(cells) + f" | {e.get('num') or '–'} | {note} |")
        lines += ["", "Lower is better. NFE: network evaluations per sample.", ""]
    else:
        lines += ["## Evaluation", "", "The run had no evaluation when it was exported "
                  "(`fewstep eval --run THIS_DIR ...` measures FID).", ""]
    if grid is not None:
        lines += ["## Samples", "", f"![samples]({grid.name})", ""]
    nfe = list(body["config"]["sample"]["nfe"])
    lines += ["## Use", "", "```python", "import fewstep", "", "model = fewstep.load(\"THIS_DIR\")",
              f"images = model.sample(range(16), nfe={nfe[0]})   # (16, C, H, W) uint8", "```", "",
              "```bash", f"fewstep sample --run THIS_DIR --nfe {','.join(map(str, nfe))} --seeds 0-63 --out grid.png",
              "```", ""]
    return "\n".join(lines)
