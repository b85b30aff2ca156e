"""The one place objectives run forward-mode AD through the backbone.

``jvp(fn, primals, tangents)`` evaluates ``fn`` and its directional derivative with
:func:`torch.func.jvp`. It is called inside the objective's ``forward`` (which DDP/FSDP wraps), so the
gradients of a loss built from either output are synchronised like any other. Backbone attention
switches itself to a forward-AD-safe path under JVP (:mod:`fewstep.kernels.attention`: the Triton JVP
flash-attention kernel on CUDA, the explicit math path elsewhere).

Gradients flow through both the primal and the tangent output (TVM's ``detach_jvp=False``); pass
``detach_tangent=True`` for stop-gradient targets (MeanFlow, sCM), which is also cheaper.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fewstep.kernels.attention import detached_tangents


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], *,
        detach_tangent: bool = False) -> tuple[Tensor, Tensor]:
    """(fn(*primals), J_fn(primals)·tangents).

    Args:
        fn: a pure function of the primals (close over labels, guidance and the backbone).
        primals: the point, e.g. (x_t, t, s) with shapes (B, C, H, W), (B,), (B,).
        tangents: the direction, same shapes and dtypes as ``primals``.
        detach_tangent: return the tangent without a graph (computed under no-grad w.r.t. parameters
            only when the primal is not needed with gradient; here it is detached after the fact).
    Returns:
        (output, tangent_output), both shaped like ``fn``'s output.
    """
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} tangents")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if p.shape != t.shape or p.dtype != t.dtype:
            raise ValueError(f"tangent {i} must match its primal: {tuple(t.shape)} {t.dtype} vs "
                             f"{tuple(p.shape)} {p.dtype}")
    with detached_tangents(detach_tangent):   # the Triton attention then builds no tangent graph
        out, tangent = torch.func.jvp(fn, primals, tangents)
    return out, (tangent.detach() if detach_tangent else tangent)
