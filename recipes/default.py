"""The recipe ``fewstep train`` uses when none is named: the smoke run on CPU, the reference setting
of the chosen objective on a GPU."""
from __future__ import annotations

import torch

from fewstep.config import DataConfig, RunConfig
from fewstep.recipes.fashion_mnist import fashion_mnist, smoke
from fewstep.recipes.imagenet import PER_GPU_MICRO_BATCH, imagenet_tvm
from fewstep.registry import recipes


@recipes.register("default", summary="CPU: smoke; GPU: TVM → the paper's ImageNet-256 w=2 settings "
                                     "(on --data, Fashion-MNIST by default), others → fashion-mnist")
def default(objective: str = "fm") -> RunConfig:
    """``smoke`` without a GPU. With one: for ``tvm`` the paper's ImageNet-256 w=2 recipe (DiT-XL/2
    18 heads, batch 2048 as 64 accumulation rounds of 32, AdamW 1e-4 (0.9, 0.95), EMA teacher 0.99,
    eval EMA 0.9999, bf16) trained on Fashion-MNIST unless ``--data`` names ImageNet latents; for other
    objectives the ``fashion-mnist`` recipe."""
    if not torch.cuda.is_available():
        cfg = smoke(objective)
    elif objective == "tvm":
        cfg = imagenet_tvm(256, 2.0, scaled=True)
        cfg.data = DataConfig(name="fashion-mnist")
        cfg.train.batch_per_gpu = PER_GPU_MICRO_BATCH   # 64 accumulation rounds on one GPU
    else:
        cfg = fashion_mnist(objective)
    cfg.recipe = "default"
    return cfg
