"""ImageNet-256 recipes of the frontier objectives, from the papers' settings as restated in
docs/design/frontier.md (§3.4 iMF, §4.6 α-Flow, §5.5 DMF). Each docstring names the constants that are
[unverified] (not in a released config) and where fewstep differs from the paper.

All train on ``imagenet-latents-256`` (prepared SD-VAE posteriors, a fresh sample per step, normalised per
channel with the constants iMF also uses: ``fewstep prepare``, docs/data.md). The SD-VAE encoders of ft-EMA
and ft-MSE are the same network (only the decoders were fine-tuned), so the latents are the papers';
samples decode with ft-EMA (iMF and DMF decode with ft-MSE: FIDs differ slightly across decoders).
fewstep's AdamW runs at a constant learning rate: the 10-epoch warm-up of iMF is not reproduced.
"""
from __future__ import annotations

import dataclasses

from fewstep.backbones.dit import DiTConfig
from fewstep.config import RunConfig, SampleConfig, TrainConfig
from fewstep.recipes.common import objective_config
from fewstep.recipes.imagenet import imagenet_data
from fewstep.registry import backbones, recipes

IMAGENET_IMAGES = 1_281_167   # training images per epoch


def kimg(steps: float, batch: int) -> float:
    return steps * batch / 1000


@backbones.register("dit-imf-xl", summary="DiT 48 blocks, width 1024, 16 heads (iMF's XL/2 size)")
def dit_imf_xl(base=None) -> DiTConfig:
    """iMF's XL/2 size (frontier.md §3.2): 48 blocks of width 1024 with 16 heads; switches of a DiT ``base`` kept."""
    if isinstance(base, DiTConfig):
        return dataclasses.replace(base, name="dit-imf-xl", depth=48, hidden_size=1024, num_heads=16)
    return DiTConfig(name="dit-imf-xl", depth=48, hidden_size=1024, num_heads=16)


def imf_network(cfg: DiTConfig) -> DiTConfig:
    """iMF's network choices that fewstep's DiT has: RMSNorm pre-norms, QK-norm, raw time inputs, an
    auxiliary v-head of 8 blocks (the trainer adds ``time_mode="h"``, the ω/t_min/t_max conditions and the
    head). Not reproduced: in-context conditioning tokens (fewstep adds the condition embeddings to
    adaLN-Zero instead), RoPE, SwiGLU and zero-initialised residual scales (frontier.md §3.2, §8)."""
    return dataclasses.replace(cfg, norm="rmsnorm", qk_norm=True, time_scale=1.0, aux_head_depth=8)


def imf_recipe(backbone: DiTConfig, guidance: float, interval: tuple[float, float], tag: str,
               objective: str) -> RunConfig:
    """The released B/2 training config (frontier.md §3.4): batch 1024, 640 epochs, AdamW (0.9, 0.95),
    weight decay 0, lr 1e-4, EMA 0.9999, 50 % s = t, logit-normal(−0.4, 1), ω on [1, 8], t_min ~ U[0, ½],
    t_max ~ U[½, 1], label dropout 0.1 (first-k), adaptive weight (1, 0.01). bf16 here (the official run
    is fp32)."""
    epochs, batch = 640, 1024
    return RunConfig(
        recipe=tag,
        objective=objective_config(objective, guidance=guidance, guidance_t_min=interval[0],
                                   guidance_t_max=interval[1]) if objective == "imf" else objective_config(objective),
        backbone=imf_network(backbone),
        data=imagenet_data(256),
        train=TrainConfig(total_kimg=epochs * IMAGENET_IMAGES / 1000, batch=batch, lr=1e-4, betas=(0.9, 0.95),
                          weight_decay=0.0, ema_betas={"ema": 0.9999}, precision="bf16", status_kimg=204.8,
                          checkpoint_kimg=10240, sample_kimg=10240, keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2), num_images=64, weights="ema"),
    )


@recipes.register("imagenet-256-imf-b2", summary="iMF-B/2, ImageNet-256: the released config (paper FID 3.39 at 1 NFE)")
def imagenet_256_imf_b2(objective: str = "imf") -> RunConfig:
    """iMF-B/2 (DiT-B/2 size: 12 blocks, width 768, 12 heads; trunk of 4, heads of 8): the only released
    training config; sampling ω = 8.0 on [0.40, 0.65] (``configs/eval_config.yml``). Paper: 3.39 at 1 NFE
    with its own in-context network."""
    base = DiTConfig(name="dit-b", depth=12, hidden_size=768, num_heads=12, patch_size=2)
    return imf_recipe(base, 8.0, (0.40, 0.65), "imagenet-256-imf-b2", objective)


@recipes.register("imagenet-256-imf-xl2", summary="iMF-XL/2, ImageNet-256 (paper FID 1.72 at 1 NFE; "
                                                  "epochs, batch and lr [unverified])")
def imagenet_256_imf_xl2(objective: str = "imf") -> RunConfig:
    """iMF-XL/2 (48 blocks, width 1024, 16 heads; heads of 8 blocks): the B/2 training settings, since the
    XL/2 ones were not released [unverified: epochs, batch, lr]. Sampling: ω = 8.0 on [0.42, 0.62], the
    1-NFE setting; the paper's 2-NFE setting is ω = 4.0 on [0.36, 0.64] (``fewstep sample --guidance 4``
    changes ω; the interval is ``objective.guidance_t_min/max``)."""
    return imf_recipe(dit_imf_xl(DiTConfig(name="dit-xl", patch_size=2)), 8.0, (0.42, 0.62), "imagenet-256-imf-xl2",
                      objective)


@recipes.register("imagenet-256-alphaflow-xl2", summary="α-Flow-XL/2-cfg, ImageNet-256 (paper FID 2.95 at 1 NFE, "
                                                        "2.34 at 2)")
def imagenet_256_alphaflow_xl2(objective: str = "alphaflow") -> RunConfig:
    """α-Flow-XL/2-cfg (frontier.md §4.6): vanilla DiT-XL/2 (LayerNorm, no QK-norm, xavier init; the
    trainer adds the t and s embedders), batch 256, 1.2 M steps, Adam (0.9, 0.95), weight decay 0,
    lr 1e-4, α: 1 → 0 over steps 600 k – 1.0 M, 50 % flow matching, CFG ω = 0.2, κ = 0.92 on (0, 0.75)
    (effective 2.5), label dropout 0.1, u_tgt clipped at 4, consistency sampling with the 2-step grid
    [1, 0.55, 0]. [unverified]: the EMA decay (0.9999 here), the time sampler (logit-normal(−0.4, 1) for
    both laws), c = 10⁻³ and the XL/2+ extension (another 60 epochs) behind the paper's 2.58."""
    batch, steps = 256, 1_200_000
    obj = objective_config(objective)
    if objective == "alphaflow":
        obj = objective_config("alphaflow", fm_fraction=0.5, alpha_start_kimg=kimg(600_000, batch),
                               alpha_end_kimg=kimg(1_000_000, batch), omega=0.2, kappa=0.92, guidance_t_min=0.0,
                               guidance_t_max=0.75, label_dropout=0.1, clamp_utgt=4.0, sampler="consistency",
                               two_step_mid=0.55)
    return RunConfig(
        recipe="imagenet-256-alphaflow-xl2", objective=obj,
        backbone=DiTConfig(name="dit-xl", depth=28, hidden_size=1152, num_heads=16, patch_size=2),
        data=imagenet_data(256),
        train=TrainConfig(total_kimg=kimg(steps, batch), batch=batch, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                          ema_betas={"ema": 0.9999}, precision="bf16", allow_tf32=True, status_kimg=51.2,
                          checkpoint_kimg=5120, sample_kimg=5120, keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2), num_images=64, weights="ema"),
    )


@recipes.register("imagenet-256-dmf-xl2", summary="DMF-XL/2, ImageNet-256: --objective fm pretrains, --objective "
                                                  "dmf --init-from RUN converts (paper FID 2.16 at 1 NFE)")
def imagenet_256_dmf_xl2(objective: str = "dmf") -> RunConfig:
    """Decoupled MeanFlow on DiT-XL/2 (frontier.md §5.5). With ``--objective dmf``: the fine-tuning script,
    split after block 20 of 28, batch 256, 400 k steps, AdamW (0.9, 0.95), eps 1e-8, weight decay 0,
    lr 1e-4, grad clip 1.0, EMA 0.9999, bf16 + TF32, model guidance ω = 0.6 on [0, 0.7] (effective 2.5);
    start it with ``--init-from`` an fm run of this recipe. With ``--objective fm``: that start point,
    flow matching with logit-normal(0, 1) times for 4 M steps at batch 256 (SiT-XL/2's length; the paper
    also used REPA, which fewstep does not have). [unverified]: which loss form and schedule gave 2.16 (the
    paper's ``+`` models); fewstep uses the paper's log-variance form (docs/design/frontier.md §5.3)."""
    batch = 256
    steps = 400_000 if objective == "dmf" else 4_000_000
    obj = objective_config("fm", t_mean=0.0, t_std=1.0) if objective == "fm" else objective_config(objective)
    return RunConfig(
        recipe="imagenet-256-dmf-xl2", objective=obj,
        backbone=DiTConfig(name="dit-xl", depth=28, hidden_size=1152, num_heads=16, patch_size=2, split_depth=20),
        data=imagenet_data(256),
        train=TrainConfig(total_kimg=kimg(steps, batch), batch=batch, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0, grad_clip=1.0, ema_betas={"ema": 0.9999}, precision="bf16",
                          allow_tf32=True, status_kimg=51.2, checkpoint_kimg=5120, sample_kimg=5120,
                          keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2, 4), num_images=64, weights="ema"),
    )
