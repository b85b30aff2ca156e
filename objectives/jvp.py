"""The one place objectives run forward-mode AD through the backbone.

``backbone_jvp(net, x, t, s, tangents, y=, **cond)`` differentiates a backbone call. A backbone that
declares ``supports_tangents`` (the DiT) computes the JVP itself, written out layer by layer
(:mod:`fewstep.backbones.dit_tangents`: fused attention kernel, one extra matmul per Linear, element-wise
rules ``torch.compile`` can fuse); any other backbone goes through :func:`jvp`, which evaluates a
closure and its directional derivative with :func:`torch.func.jvp`. :func:`functorch_jvp` forces the
latter (tests compare the two; benchmarks time both). It is called inside the objective's ``forward`` (which DDP/FSDP wraps), so the
gradients of a loss built from either output are synchronised like any other. Backbone attention
switches itself to a forward-AD-safe path under JVP (:mod:`fewstep.kernels.attention`: the Triton JVP
flash-attention kernel on CUDA, the explicit math path elsewhere).

Gradients flow through both the primal and the tangent output (TVM's ``detach_jvp=False``); pass
``detach_tangent=True`` for stop-gradient targets (MeanFlow, sCM), which is also cheaper.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from fewstep.kernels.attention import detached_tangents

_force_functorch = 0


@contextlib.contextmanager
def functorch_jvp(enabled: bool = True) -> Iterator[None]:
    """Within this block :func:`backbone_jvp` uses ``torch.func.jvp`` even for backbones with their own
    tangent rules. Nests; not thread-local."""
    global _force_functorch
    _force_functorch += int(enabled)
    try:
        yield
    finally:
        _force_functorch -= int(enabled)


def backbone_jvp(net: nn.Module, x: Tensor, t: Tensor, s: Tensor | None,
                 tangents: tuple[Tensor | None, Tensor | None, Tensor | None], *, y: Tensor | None = None,
                 detach_tangent: bool = False, head: str = "main",
                 **cond: Tensor) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """(net(x, t, s, y, **cond), its JVP along tangents = (tx, tt, ts)).

    Args:
        net: a backbone; called through ``__call__`` so module hooks (FSDP, compile) apply.
        x (B, C, H, W), t (B,), s (B,) or ``None``: the point; ``y`` and ``cond`` get no tangent.
        tangents: (tx, tt, ts) shaped like (x, t, s); ``None`` entries are zero.
        detach_tangent: return the tangent without a graph (stop-gradient targets).
        head: ``main``, or ``both`` for a backbone with an auxiliary head: its output is returned too,
            from the same call, with its graph but without a tangent (iMF's v-head).
    Returns:
        (output, tangent_output), both shaped like x; with ``head="both"``, (output, tangent, aux).
    """
    if getattr(net, "supports_tangents", False) and _force_functorch == 0:
        outs = net(x, t, s, y=y, tangents=tangents, head=head, **cond)
        out, tout = outs[0], outs[1]
        tout = tout.detach() if detach_tangent else tout
        return (out, tout) if head == "main" else (out, tout, outs[2])
    tx, tt, ts = tangents
    tx = torch.zeros_like(x) if tx is None else tx
    tt = torch.zeros_like(t) if tt is None else tt
    extra = {} if head == "main" else {"head": head}
    if s is None:
        primals, tans = (x, t), (tx, tt)
        fn = lambda x_, t_: net(x_, t_, None, y=y, **extra, **cond)   # noqa: E731
    else:
        primals, tans = (x, t, s), (tx, tt, torch.zeros_like(s) if ts is None else ts)
        fn = lambda x_, t_, s_: net(x_, t_, s_, y=y, **extra, **cond)   # noqa: E731
    return jvp(fn, primals, tans, detach_tangent=detach_tangent, has_aux=head == "both")


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...], *,
        detach_tangent: bool = False, has_aux: bool = False) -> tuple[Tensor, ...]:
    """(fn(*primals), J_fn(primals)·tangents).

    Args:
        fn: a pure function of the primals (close over labels, guidance and the backbone).
        primals: the point, e.g. (x_t, t, s) with shapes (B, C, H, W), (B,), (B,).
        tangents: the direction, same shapes and dtypes as ``primals``.
        detach_tangent: return the tangent without a graph (computed under no-grad w.r.t. parameters
            only when the primal is not needed with gradient; here it is detached after the fact).
        has_aux: ``fn`` returns (output, aux); aux is returned as a third value, without a tangent.
    Returns:
        (output, tangent_output), both shaped like ``fn``'s output; with ``has_aux``, (output,
        tangent_output, aux).
    """
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} tangents")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if p.shape != t.shape or p.dtype != t.dtype:
            raise ValueError(f"tangent {i} must match its primal: {tuple(t.shape)} {t.dtype} vs "
                             f"{tuple(p.shape)} {p.dtype}")
    # Compiled regions run eagerly under torch.func.jvp: Dynamo cannot trace a functorch transform entered
    # outside the compiled region (on CUDA it tried and failed to build the forward-AD attention kernel).
    with detached_tangents(detach_tangent), torch.compiler.set_stance("force_eager"):
        result = torch.func.jvp(fn, primals, tangents, has_aux=has_aux)
    out, tangent = result[0], result[1]
    tangent = tangent.detach() if detach_tangent else tangent
    return (out, tangent, result[2]) if has_aux else (out, tangent)
