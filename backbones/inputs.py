"""Conditioning shared by every backbone: input checks with messages that name the problem, and the
summed conditioning vector c = emb_t(t) + emb_gap(t − s) + emb_guidance(β) + E[y]."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

_trusted = 0


@contextlib.contextmanager
def trusted_labels(enabled: bool = True) -> Iterator[None]:
    """Skip the label *value* check (the one host sync of a backbone call) in this block. The trainer
    and benchmarks use it: their labels were range-checked when the dataset was loaded. Shapes and
    dtypes are still checked. Nests; not thread-local."""
    global _trusted
    _trusted += int(enabled)
    try:
        yield
    finally:
        _trusted -= int(enabled)


def condition_vector(net: nn.Module, t: Tensor, s: Tensor | None, y: Tensor | None,
                     cond: dict[str, Tensor]) -> Tensor:
    """(B, D) conditioning of a backbone with ``t_embedder`` and optional ``gap_embedder``,
    ``guidance_embedder`` and ``y_embedder`` (``None`` when absent). The gap term is skipped for a
    one-time call (``s=None``); ``y=None`` means the null label ``net.num_classes`` for every sample."""
    c = net.t_embedder(t)
    if net.gap_embedder is not None and s is not None:
        c = c + net.gap_embedder(t - s)
    return add_static_conditions(net, c, t.shape[0], y, cond)


def add_static_conditions(net: nn.Module, c: Tensor, batch: int, y: Tensor | None,
                          cond: dict[str, Tensor]) -> Tensor:
    """c + emb_guidance(β) + E[y]: the conditions that never carry a JVP tangent. c (B, D)."""
    if net.guidance_embedder is not None:
        c = c + net.guidance_embedder(cond["guidance"])
    if net.y_embedder is not None:
        if y is None:
            y = torch.full((batch,), net.num_classes, dtype=torch.long, device=c.device)
        c = c + net.y_embedder(y)
    return c


def check_conditioning(kind: str, batch: int, t: Tensor, s: Tensor | None, y: Tensor | None,
                       cond: dict[str, Tensor], *, has_gap: bool, has_guidance: bool, has_labels: bool,
                       num_classes: int) -> None:
    """Validate t, s, guidance and labels of a backbone call.

    Args:
        kind: the backbone's name in messages (``DiT``, ``MLP``).
        batch: B, the number of samples in x.
        t, s: (B,) float times; ``s=None`` for a one-time call.
        y: (B,) int labels in [0, num_classes] (num_classes = null), or ``None``.
        cond: extra keyword conditions; only ``guidance`` ((B,) float) is known.
        has_gap, has_guidance, has_labels: which embedders the backbone has.
    """
    unknown = sorted(set(cond) - {"guidance"})
    if unknown:
        raise TypeError(f"unknown conditions {unknown}; the {kind} accepts only guidance=")
    for name, v in {"t": t, "s": s, **cond}.items():
        if v is None:
            continue
        if not torch.is_tensor(v) or v.shape != (batch,) or not v.is_floating_point():
            got = f"{v.dtype} of shape {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)
            raise ValueError(f"{name} must be a float tensor of shape (B,) = ({batch},), got {got}")
    if s is not None and not has_gap:
        raise ValueError(f"got s: a two-time call F(x, t, s) on a one-time {kind} (gap_embedder=False); "
                         "pass s=None or build with gap_embedder=True")
    if has_guidance and "guidance" not in cond:
        raise ValueError(f"missing guidance=: this {kind} has a guidance embedder (guidance_embedder=True); "
                         "pass a (B,) float tensor (TVM feeds β = 1/w)")
    if not has_guidance and "guidance" in cond:
        raise ValueError(f"got guidance= but this {kind} has no guidance embedder (guidance_embedder=False)")
    if y is None:
        return
    if not has_labels:
        raise ValueError(f"got labels y but this {kind} is unconditional (num_classes=0); pass y=None")
    if y.shape != (batch,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an int64 tensor of shape (B,) = ({batch},), got {y.dtype} "
                         f"of shape {tuple(y.shape)}")
    if not (_trusted or y.is_meta or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(y)):
        if bool(((y < 0) | (y > num_classes)).any()):  # one host sync
            raise ValueError(f"labels y must lie in [0, {num_classes}] ({num_classes} = null), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
