"""Evaluation of models trained on ``points`` data (``toy2d``): sliced Wasserstein per NFE and a scatter plot.

For each number of function evaluations (NFE) the objective's own few-step sampler draws ``num``
points from seeds ``seed … seed + num − 1`` (labels drawn per seed, as :func:`fewstep.sample.sample`
does), and SW₂ (:mod:`fewstep.metrics.sliced_wasserstein`) is measured against the first ``num``
held-out test points. The noise floor is SW₂ between the first and the second ``num`` test points: two
independent samples of the true distribution of the same size, so a perfect model scores ≈ the floor.
The floor is itself noisy: on well-separated modes SW₂ is dominated by how many points land in each
mode, and for ``toy2d`` at num = 5000 it ranges over ≈ 0.04–0.08 between slices, so differences
smaller than ≈ 0.03 are not significant.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from fewstep.contracts import Objective
from fewstep.metrics.sliced_wasserstein import sliced_wasserstein
from fewstep.files import write_json
from fewstep.plots import PlotsUnavailable, scatter_png, step_label
from fewstep.sample import sample

log = logging.getLogger(__name__)

NUM_PROJECTIONS = 1024


def held_out_points(dataset: Any, start: int, num: int) -> torch.Tensor:
    """Items ``start … start + num − 1`` of a points dataset, flattened to (num, D) float32."""
    indices = torch.arange(start, start + num)
    if hasattr(dataset, "get_batch"):
        x, _ = dataset.get_batch(indices)
    else:
        x = torch.stack([dataset[int(i)][0] for i in indices])
    return x.reshape(num, -1).float()


def evaluate_points(objective: Objective, dataset_test: Any, run_dir: str | os.PathLike,
                    nfes: Sequence[int] = (1, 4), num: int = 5000, weights: str = "ema", seed: int = 0,
                    guidance: float | None = None) -> dict[str, Any]:
    """Score few-step samples of a points model against held-out data; write metrics and a plot.

    Args:
        objective: a trained objective whose backbone takes (B, D, 1, 1) items.
        dataset_test: the held-out split (``toy2d`` test), at least 2·``num`` items.
        run_dir: where ``metrics.json`` and ``samples/scatter.png`` go.
        nfes: sampler jumps to evaluate, e.g. (1, 4).
        num: samples per NFE, and test points per reference set.
        weights: ``online`` or an EMA track name.
        seed: first sample seed; also seeds the SW projection directions.
        guidance: CFG scale w at sampling (``None``: the objective's default).
    Returns:
        The dict written to ``run_dir/metrics.json``: ``sliced_wasserstein`` (NFE as a string → SW₂ in
        data units), ``test_reference_floor`` (SW₂ between two disjoint halves of the test data),
        ``evaluations`` (NFE → backbone evaluations per sample), ``num``, ``weights``, ``seed``,
        ``guidance``, ``num_projections``, ``metric`` and ``scatter`` (the PNG path and its panels; ``None`` for 1-D data).
    """
    if num < 1 or 2 * num > len(dataset_test):
        raise ValueError(f"evaluate_points needs 1 ≤ num ≤ len(test)/2 = {len(dataset_test) // 2} "
                         f"(num samples vs num test points, and a floor from 2·num test points), got num={num}")
    run_dir = Path(run_dir)
    reference = held_out_points(dataset_test, 0, num)
    other_half = held_out_points(dataset_test, num, num)

    def sw(points: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(seed)          # the same slices for every NFE and the floor
        return sliced_wasserstein(points, reference, NUM_PROJECTIONS, gen)

    seeds = list(range(seed, seed + num))
    scores, evaluations, panels = {}, {}, [reference]
    for nfe in nfes:
        result = sample(objective, seeds, nfe, weights=weights, guidance=guidance, batch_size=num)
        points = result.images.reshape(num, -1).float()
        if not torch.isfinite(points).all():
            bad = int((~torch.isfinite(points).all(dim=1)).sum())
            raise FloatingPointError(f"{bad} of {num} samples at NFE {nfe} are not finite; the model diverged")
        scores[str(nfe)] = sw(points)
        evaluations[str(nfe)] = result.evaluations
        panels.append(points)
    scatter = None
    if reference.shape[1] >= 2:                               # first two coordinates of each set
        titles = ["held-out data", *(step_label(n) for n in nfes)]
        try:
            scatter_png(run_dir / "samples" / "scatter.png", [p[:, :2] for p in panels], titles,
                        title=f"{num} points per panel ({weights} weights)")
            scatter = {"path": "samples/scatter.png", "panels": titles}
        except PlotsUnavailable as exc:
            log.warning(f"samples/scatter.png not written: {exc}")
    metrics = {
        "sliced_wasserstein": scores,
        "test_reference_floor": sw(other_half),
        "evaluations": evaluations,
        "num": num, "weights": weights, "seed": seed, "guidance": guidance,
        "num_projections": NUM_PROJECTIONS,
        "metric": "SW-2 (sliced Wasserstein-2, data units) of samples vs the first `num` test points",
        "scatter": scatter,
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics
