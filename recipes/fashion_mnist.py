"""Fashion-MNIST recipes: the CPU demo, the GPU comparison setting and its short-budget sweep variant.

Fashion-MNIST is padded to 32×32 so a patch-2 DiT sees 256 tokens, as on ImageNet-256 latents.
"""
from __future__ import annotations

from fewstep.backbones.dit import DiTConfig, tvm_variant
from fewstep.config import DataConfig, RunConfig, SampleConfig, TrainConfig
from fewstep.recipes.common import objective_config, only_known
from fewstep.registry import recipes

# Training length (kimg) the sweep recipe's schedules are scaled to. With five members sharing one H100
# and train.compile=true, 4 minutes each train fm 243, ECT 193, sCM 102, MeanFlow 87 and TVM 63 kimg
# (docs/results/fashion-mnist.md); an earlier run with three members reached fm 378 and ECT 296 kimg.
# ECT's gap halves every SWEEP_KIMG/8: at 12.5 kimg per stage ECT reached stage 23 (relative gap 2⁻²³,
# below float32 resolution) and diverged, so the stages are scaled to 300 kimg.
SWEEP_KIMG = 300.0


@recipes.register("smoke", summary="CPU demo: Fashion-MNIST, small DiT (patch 4); ~5 min on 2 cores for fm, "
                                   "up to ~5x that for JVP objectives")
def smoke(objective: str = "fm") -> RunConfig:
    """A run that trains on 2 CPU cores in about 5 minutes for flow matching (≈ 400 img/s, 120 kimg; the JVP
    objectives take 3–5× as long, ECT 1.3×: docs/speed.md) and draws recognisable
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
    (RMS norms, QK-norm, modulation norm, spectral init), AdamW (0.9, 0.95), batch 256, bf16. The JVP
    objectives run the DiT's explicit JVP with the fused attention kernel (O(N·d) memory), so batch 256
    needs no accumulation on one GPU; add ``--set train.compile=true`` on a GPU for about 3× the speed.
    """
    return RunConfig(
        recipe="fashion-mnist",
        objective=objective_config(objective),
        backbone=tvm_variant(DiTConfig(name="dit-s", depth=12, hidden_size=384, num_heads=6, patch_size=2)),
        data=DataConfig(name="fashion-mnist", num_workers=0),
        train=TrainConfig(total_kimg=3000, batch=256, lr=2e-4,
                          betas=(0.9, 0.95), ema_betas={"ema": 0.9999},
                          precision="bf16", status_kimg=20, checkpoint_kimg=500, sample_kimg=250,
                          keep_checkpoints=3),
        sample=SampleConfig(nfe=(1, 2, 4), num_images=100, weights="ema"),
    )


@recipes.register("fashion-mnist-sweep", summary="GPU objective comparison (fewstep sweep): the fashion-mnist "
                  "setting with schedules and EMA for budgets of minutes per member")
def fashion_mnist_sweep(objective: str = "fm") -> RunConfig:
    """The ``fashion-mnist`` setting (class-conditional DiT-S/2 with TVM's architecture, AdamW 2e-4 (0.9, 0.95),
    batch 256, bf16) for ``fewstep sweep --minutes N``: every member gets the same wall-clock budget, so
    ``total_kimg`` is only a cap. Each objective keeps its paper's defaults (``objective_config``: fm with
    label dropout 0.1 and no guidance at sampling; MeanFlow ω = 1, κ = 0.5 (CFG 2 learnt in training); TVM
    w = 2, scaled; sCM/ECT σ_d = 0.5 and their CIFAR-10 noise schedules) except schedules stated in
    images, which are scaled from the papers' hundreds of thousands of steps to a budget of
    ≈ SWEEP_KIMG kimg: sCM's tangent warm-up over its first 10 %, ECT's gap halving every 1/8 of it and
    α-Flow's α: 1 → 0 over all of it; Shortcut's EMA teacher decays at 0.995 per step (the paper's 0.999
    lags a run of ≈ 1 200 steps). iMF keeps its B/2 sampling guidance (ω = 8 on [0.40, 0.65]); DMF
    converts a flow-matching run, so sweep it as ``dmf@fm`` (``fewstep sweep --objectives fm,…,dmf@fm``).
    The evaluation EMA is 0.99 per step (a 0.9999 EMA would still hold the initial weights after the few
    hundred steps of such a run); TVM's own EMA teacher stays at 0.99. For longer budgets scale the
    schedules with per-member overrides (``objective.warmup_kimg``, ``objective.stage_kimg``) and the EMA
    (``train.ema_betas``). Objectives with a JVP accumulate two micro-batches of 128, since five members
    share one GPU's memory. On a GPU add ``--set train.compile=true``.
    """
    cfg = fashion_mnist(objective)
    cfg.recipe = "fashion-mnist-sweep"
    cfg.objective = only_known(cfg.objective, warmup_kimg=SWEEP_KIMG / 10, stage_kimg=SWEEP_KIMG / 8,
                               alpha_start_kimg=0.0, alpha_end_kimg=SWEEP_KIMG)
    if objective == "shortcut":   # its EMA teacher on the evaluation EMA's horizon (0.999 lags a short run)
        cfg.objective = only_known(cfg.objective, teacher_beta=0.995)
    cfg.train.total_kimg = 100_000.0
    cfg.train.ema_betas = {"ema": 0.99}
    cfg.train.status_kimg, cfg.train.checkpoint_kimg, cfg.train.sample_kimg = 5.0, 25.0, 0.0
    cfg.train.keep_checkpoints = 2
    from fewstep.registry import objectives

    if objectives.get(objective).needs.jvp:   # five members share one GPU's memory: TVM at 256 ran out
        cfg.train.batch_per_gpu = 128
    cfg.sample = SampleConfig(nfe=(1, 2, 4), num_images=64, weights="ema")
    return cfg
