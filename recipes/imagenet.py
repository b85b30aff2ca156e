"""ImageNet TVM recipes matching the paper's Table 6 and the official configs (``docs/design/tvm.md`` §2.4, §3).

All four: DiT-XL/2 with 18 heads and TVM's architecture (RMSNorm pre-norms, QK RMS-norm, modulation
RMS-norm), the released code's effective initialisation (below), gap* time sampler, EMA teacher 0.99, eval EMA 0.9999, label dropout 0.1,
AdamW lr 1e-4, betas (0.9, 0.95), no weight decay, constant LR, batch 2048, 300K steps (614,400 kimg),
bf16 autocast with fp32 master weights, TF32 off. Gradient clipping (1.0) only at 512 px.
They train on SD-VAE latents (4×32×32 at 256 px, 4×64×64 at 512 px) from the ``imagenet-latents-256`` /
``imagenet-latents-512`` datasets (:mod:`fewstep.data.latents`): a directory written once by
``fewstep prepare --data imagefolder:IMAGENET/train --resolution R --out DIR``, found through ``data.root``
or ``$FEWSTEP_DATA``. Every step draws a fresh latent from the stored posterior and normalises it with the
``docs/design/tvm.md`` §3 constants (:data:`~fewstep.data.latents.IMAGENET_256`, ``IMAGENET_512``; final std 1);
samples decode with ``stabilityai/sd-vae-ft-ema`` to uint8 by truncation (§4).

Initialisation: these recipes use ``backbone.init="spectral-released"`` with N(0, 0.02) time/gap/guidance
MLPs, the init the released TVM code actually produces, because the paper's numbers came from that code
(docs/design/tvm-init.md). It differs from the paper in two places: the patch embedding keeps its
unnormalised xavier-normal weight (the code's spectral division never reaches the parameter), and the
time MLPs stay N(0, 0.02) even where Table 6 says "spectral" (256 w=2, 512 w=2.25; the config's
``time_specinit`` never reaches the model). ``imagenet_tvm(..., init="written")`` (or ``--set
backbone.init=spectral --set backbone.time_init=spectral``) gives TVM as written in the paper.
"""
from __future__ import annotations

import dataclasses

from fewstep.backbones.dit import DiTConfig, tvm_variant
from fewstep.config import DataConfig, RunConfig, SampleConfig, TrainConfig
from fewstep.data.latents import IMAGENET_FORMATS
from fewstep.recipes.common import objective_config
from fewstep.registry import recipes

PAPER_STEPS = 300_000
PAPER_BATCH = 2048
# Paper Table 6, "time-embedding init" per (resolution, w): what the paper says, used by init="written".
TABLE6_TIME_INIT = {(256, 2.0): "spectral", (256, 1.75): "normal", (512, 2.5): "normal", (512, 2.25): "spectral"}
# Images per GPU per forward: the official 64-GPU setup's 2048 / 64, which fits an 80 GB GPU (docs/speed.md);
# fewer GPUs accumulate rounds of 32 (train.batch_per_gpu never changes the experiment: gradient
# accumulation keeps the global batch).
PER_GPU_MICRO_BATCH = 32


def imagenet_data(resolution: int) -> DataConfig:
    """The prepared ImageNet latents at ``resolution`` (256 or 512) px; the posterior gather runs in the
    training process with a prefetch thread (no workers needed: the data is memory-mapped Arrow)."""
    if resolution not in IMAGENET_FORMATS:
        raise ValueError(f"ImageNet recipes exist at {sorted(IMAGENET_FORMATS)} px, not {resolution}")
    return DataConfig(name=f"imagenet-latents-{resolution}", num_workers=0)


def imagenet_tvm(resolution: int, guidance: float, scaled: bool, init: str = "released") -> RunConfig:
    """One of the paper's ImageNet TVM settings.

    Args:
        resolution: 256 or 512 (pixels; latents are resolution/8).
        guidance: the constant CFG scale w distilled in training (and used at sampling).
        scaled: the "scaled parameterisation" (network output multiplied by w).
        init: ``released`` (the released code's effective init: spectral Linears, unnormalised
            xavier-normal patch embedding, N(0, 0.02) time MLPs) or ``written`` (the paper: spectral
            everywhere, time MLPs as Table 6 says for this setting).
    """
    if init not in ("released", "written"):
        raise ValueError(f"init must be 'released' or 'written', got {init!r}")
    backbone = tvm_variant(DiTConfig(name="dit-xl", depth=28, hidden_size=1152, num_heads=16, patch_size=2))
    if init == "released":
        backbone = dataclasses.replace(backbone, init="spectral-released", time_init="normal")
    else:
        backbone = dataclasses.replace(backbone, init="spectral",
                                       time_init=TABLE6_TIME_INIT.get((resolution, guidance), "normal"))
    tag = f"imagenet-{resolution}-tvm-w{str(guidance).replace('.', 'p')}"
    return RunConfig(
        recipe=tag,
        objective=objective_config("tvm", guidance=guidance, scaled=scaled),
        backbone=backbone,
        data=imagenet_data(resolution),
        train=TrainConfig(total_kimg=PAPER_STEPS * PAPER_BATCH / 1000, batch=PAPER_BATCH,
                          batch_per_gpu=PER_GPU_MICRO_BATCH, lr=1e-4,
                          betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          grad_clip=1.0 if resolution == 512 else None, ema_betas={"ema": 0.9999},
                          precision="bf16", allow_tf32=False, status_kimg=204.8, checkpoint_kimg=10240,
                          sample_kimg=10240, keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2, 4), num_images=64, weights="ema", guidance=guidance),
    )


@recipes.register("imagenet-256-tvm-w2", summary="TVM paper, ImageNet-256, w=2 (FID 3.29 at 1 NFE)")
def imagenet_256_w2(objective: str = "tvm") -> RunConfig:
    return _with_objective(imagenet_tvm(256, 2.0, scaled=True), objective)


@recipes.register("imagenet-256-tvm-w1p75", summary="TVM paper, ImageNet-256, w=1.75 (FID 1.99 at 4 NFE)")
def imagenet_256_w1p75(objective: str = "tvm") -> RunConfig:
    return _with_objective(imagenet_tvm(256, 1.75, scaled=True), objective)


@recipes.register("imagenet-512-tvm-w2p5", summary="TVM paper, ImageNet-512, w=2.5, unscaled (FID 4.32 at 1 NFE)")
def imagenet_512_w2p5(objective: str = "tvm") -> RunConfig:
    return _with_objective(imagenet_tvm(512, 2.5, scaled=False), objective)


@recipes.register("imagenet-512-tvm-w2p25", summary="TVM paper, ImageNet-512, w=2.25 (FID 2.94 at 4 NFE)")
def imagenet_512_w2p25(objective: str = "tvm") -> RunConfig:
    return _with_objective(imagenet_tvm(512, 2.25, scaled=True), objective)


def _with_objective(cfg: RunConfig, objective: str) -> RunConfig:
    if objective != "tvm":
        cfg.objective = objective_config(objective)
    return cfg
