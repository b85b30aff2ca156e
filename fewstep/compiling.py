"""Speed and memory settings of an objective: ``torch.compile`` region by region, activation checkpointing.

Every backbone inside an objective (the online net, its teacher, EMA tracks) that lists
``compile_regions()`` gets those modules compiled in place (``nn.Module.compile``); the DiT lists its
blocks, so one graph per call mode (forward with grad, explicit JVP with tangents, no-grad teacher) is
traced once and shared by all blocks. The fused JVP attention is a ``torch.library`` custom op
(:mod:`fewstep.kernels.jvp_ops`), so the block graphs have no breaks; Inductor fuses the element-wise
tangent rules of :mod:`fewstep.backbones.tangents` into a few kernels. Compile after the objective is
built (its teacher copies exist) and moved to its device, before the first step.
"""
from __future__ import annotations

import torch
from torch import nn


def set_activation_checkpointing(objective: nn.Module, enabled: bool = True, blocks: int | None = None) -> None:
    """Switch activation checkpointing on every backbone in ``objective`` that offers it
    (``set_activation_checkpointing``: the DiT recomputes each block in backward); ``blocks``: only the
    first this many blocks (``None``: all; passed only when given, for backbones without the option)."""
    for module in objective.modules():
        if hasattr(module, "set_activation_checkpointing"):
            if blocks is None:
                module.set_activation_checkpointing(enabled)
            else:
                module.set_activation_checkpointing(enabled, blocks=blocks)


def compile_objective(objective: nn.Module, mode: str | None = None, tuning: bool = False) -> int:
    """Compile the regions of every backbone in ``objective`` in place; returns how many were compiled.

    Args:
        mode: ``torch.compile`` mode (``None`` = default; ``max-autotune-no-cudagraphs`` searches GEMM
            configs). CUDA graphs (``reduce-overhead``) do not suit training steps whose graphs free
            and reallocate activations between regions.
        tuning: Inductor's coordinate-descent tuning of its generated Triton kernels' launch configs
            (``train.compile_tuning``): most of a TVM step's time outside GEMMs is in those fused
            element-wise and reduction kernels (tangent rules and their backward). Not with ``mode``
            (``torch.compile`` takes a mode or options, not both).
    """
    if tuning and mode is not None:
        raise ValueError(f"compile_objective: tuning sets Inductor options, which torch.compile does not take "
                         f"together with mode={mode!r}")
    kwargs = {"options": {"coordinate_descent_tuning": True}} if tuning else {"mode": mode}
    count = 0
    for module in objective.modules():
        regions = getattr(module, "compile_regions", None)
        if callable(regions):
            for region in regions():
                region.compile(dynamic=False, **kwargs)
                count += 1
    config = torch._dynamo.config          # blocks of several backbones × call modes share one code object
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))
    return count
