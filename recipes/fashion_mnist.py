"""Fashion-MNIST recipes: the CPU demo and the GPU comparison setting.

Fashion-MNIST is padded to 32×32 so a patch-2 DiT sees 256 tokens, as on ImageNet-256 latents.
"""
from __future__ import annotations

from fewstep.backbones.dit import DiTConfig, tvm_variant
from fewstep.config import DataConfig, RunConfig, SampleConfig, TrainConfig
from fewstep.recipes.common import objective_config
from fewstep.registry import recipes


@recipes.register("smoke", summary="CPU demo: Fashion-MNIST, small DiT (patch 4), a few minutes on 2 cores")
def smoke(objective: str = "fm") -> RunConfig:
    """A run that trains on 2 CPU cores in about 5 minutes (≈ 400 img/s, 120 kimg) and draws recognisable
    garments at 4 steps (1-step flow matching gives blurry class means, as it should).

    Differences from the GPU recipe, and why: patch 4 (64 tokens instead of 256) and a 4-block, 128-wide
    DiT so one step takes milliseconds; a higher learning rate (1e-3) because the run is short; fp32
    because CPUs have no fast bf16; an EMA of 0.995 per step, since a 0.9999 EMA would still be close to
    the initial weights after a few thousand steps.
    """
    return RunConfig(
        recipe="smoke",
        objective=objective_config(objective),
        backbone=DiTConfig(name="dit-debug", depth=4, hidden_size=128, num_heads=4, patch_size=4),
        data=DataConfig(name="fashion-mnist"),
        train=TrainConfig(total_kimg=120, batch=64, lr=1e-3, ema_betas={"ema": 0.995}, precision="fp32",
                          status_kimg=2, checkpoint_kimg=50, sample_kimg=0, keep_checkpoints=2),
        sample=SampleConfig(nfe=(1, 4), num_images=64, weights="ema"),
    )


@recipes.register("fashion-mnist", summary="GPU: Fashion-MNIST 32×32, class-conditional DiT-S/2 (TVM architecture)")
def fashion_mnist(objective: str = "fm") -> RunConfig:
    """The setting used to compare objectives on one GPU: DiT-S/2 with TVM's architecture improvements
    (RMS norms, QK-norm, modulation norm, spectral init), AdamW (0.9, 0.95), batch 256, bf16.

    Objectives that run a JVP use micro-batches of 64 (4 accumulation rounds): until the fused JVP
    attention kernel lands, attention under JVP keeps O(N²) activations and batch 256 does not fit in
    80 GB. Accumulation does not change the experiment.
    """
    from fewstep.registry import objectives

    jvp = objectives.get(objective).needs.jvp
    return RunConfig(
        recipe="fashion-mnist",
        objective=objective_config(objective),
        backbone=tvm_variant(DiTConfig(name="dit-s", depth=12, hidden_size=384, num_heads=6, patch_size=2)),
        data=DataConfig(name="fashion-mnist", num_workers=0),
        train=TrainConfig(total_kimg=3000, batch=256, batch_per_gpu=64 if jvp else None, lr=2e-4,
                          betas=(0.9, 0.95), ema_betas={"ema": 0.9999},
                          precision="bf16", status_kimg=20, checkpoint_kimg=500, sample_kimg=250,
                          keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2, 4), num_images=100, weights="ema"),
    )
