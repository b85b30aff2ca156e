"""The 2-D toy recipe: every objective trained and scored on a CPU in about a minute.

Data: ``toy2d`` (8 Gaussians on a circle, unit std, 8 classes). Backbone: a residual MLP. At the end
of training the loop writes ``metrics.json`` (sliced Wasserstein-2 to held-out points at 1 and 4
steps, and the noise floor between two halves of the test split) and ``samples/scatter.png``.
"""
from __future__ import annotations

from fewstep.backbones.mlp import MLPConfig
from fewstep.config import DataConfig, RunConfig, SampleConfig, TrainConfig
from fewstep.recipes.common import objective_config
from fewstep.registry import recipes


@recipes.register("toy2d", summary="CPU minute: 2-D 8-Gaussian mixture, MLP; metrics.json with 1- and "
                                   "4-step sliced Wasserstein")
def toy2d(objective: str = "fm") -> RunConfig:
    """A run that trains in about a minute on 2 CPU cores and is scored by sliced Wasserstein.

    Choices, and why: a width-256, depth-3 residual MLP; batch 256 and a high learning rate (1e-3)
    because the run is short; AdamW betas (0.9, 0.99); fp32; an EMA of 0.999 per step (≈ 1 000-step
    horizon, a third of the run); no periodic grids (points have no image grid) and a checkpoint only
    at the end. ``sample.num_images`` is the number of points scored per NFE.
    """
    return RunConfig(
        recipe="toy2d",
        objective=objective_config(objective),
        backbone=MLPConfig(name="mlp", width=256, depth=3),
        data=DataConfig(name="toy2d"),
        train=TrainConfig(total_kimg=600, batch=256, lr=1e-3, betas=(0.9, 0.99), ema_betas={"ema": 0.995},
                          precision="fp32", status_kimg=50, checkpoint_kimg=0, sample_kimg=0,
                          keep_checkpoints=1),
        sample=SampleConfig(nfe=(1, 4), num_images=5000, weights="ema"),
    )
