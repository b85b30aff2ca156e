"""Conditioning shared by every backbone: input checks with messages that name the problem, and the
summed conditioning vectors c = (time part by ``time_mode``) + emb_guidance(β) + Σ emb_k(condition k) + E[y]."""
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


TIME_MODES = ("t+h", "h", "t+s", "split")
"""How a two-time backbone embeds (t, s) (``time_mode``; docs/design/frontier.md §1):

* ``t+h``: emb_t(t) + emb_gap(t − s) (MeanFlow, TVM, Shortcut); a one-time call (``s=None``) skips the gap.
* ``h``: emb_gap(t − s) only, no absolute time (iMF); a one-time call embeds h = 0.
* ``t+s``: emb_t(t) + emb_s(s), two absolute times (α-Flow); a one-time call means s = t.
* ``split``: no second embedder; blocks before ``split_depth`` see emb_t(t), later blocks and the output
  layer see emb_t(s) (Decoupled MeanFlow); at s = t (or ``s=None``) it is the one-time model exactly.
"""


def split_index(net: nn.Module) -> int:
    """Index of the first block that sees the late (s) conditioning: ``split_depth`` in ``split`` mode
    (default round(0.7·depth), DMF's ≈ 2/3), else the depth (every block sees the same vector)."""
    cfg = net.config
    depth = cfg.depth
    if getattr(cfg, "time_mode", "t+h") != "split":
        return depth
    return default_split(depth) if cfg.split_depth is None else cfg.split_depth


def default_split(depth: int) -> int:
    """round(0.7·depth), at least 1 and at most depth − 1 when depth ≥ 2 (DMF: 20 of 28, 17 of 24)."""
    return min(max(1, round(0.7 * depth)), max(1, depth - 1))


def time_conditions(net: nn.Module, t: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor]:
    """(c_early, c_late): the time part of the conditioning, (B, D) each, for blocks before and from
    :func:`split_index` on (the same tensor unless ``time_mode="split"``). See :data:`TIME_MODES`."""
    mode = net.time_mode
    if mode == "split":
        c_t = net.t_embedder(t)
        return c_t, (c_t if s is None else net.t_embedder(s))
    if mode == "h":
        c = net.gap_embedder(torch.zeros_like(t) if s is None else t - s)
    elif mode == "t+s":
        c = net.t_embedder(t)
        if net.gap_embedder is not None:
            c = c + net.gap_embedder(t if s is None else s)
    else:
        c = net.t_embedder(t)
        if net.gap_embedder is not None and s is not None:
            c = c + net.gap_embedder(t - s)
    return c, c


def condition_vector(net: nn.Module, t: Tensor, s: Tensor | None, y: Tensor | None,
                     cond: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(c_early, c_late), each (B, D): :func:`time_conditions` plus the static conditions (guidance,
    extra scalar conditions, label). ``y=None`` means the null label ``net.num_classes`` for every
    sample."""
    early, late = time_conditions(net, t, s)
    terms = static_conditions(net, t.shape[0], y, cond, early.device)
    early_c = fold(early, terms)
    return early_c, (early_c if late is early else fold(late, terms))


def static_conditions(net: nn.Module, batch: int, y: Tensor | None, cond: dict[str, Tensor],
                      device: torch.device) -> list[Tensor]:
    """[emb_guidance(β), emb_k(cond[k]) for each extra condition, E[y]], each (B, D): the conditions
    that never carry a JVP tangent (only those the backbone has)."""
    terms = []
    if net.guidance_embedder is not None:
        terms.append(net.guidance_embedder(cond["guidance"]))
    for name, embedder in net.cond_embedders.items():
        terms.append(embedder(cond[name]))
    if net.y_embedder is not None:
        if y is None:
            y = torch.full((batch,), net.num_classes, dtype=torch.long, device=device)
        terms.append(net.y_embedder(y))
    return terms


def fold(c: Tensor, terms: list[Tensor]) -> Tensor:
    """c + terms[0] + terms[1] + …, added left to right (one summation order everywhere, so a split
    model at s = t is bitwise the one-time model)."""
    for term in terms:
        c = c + term
    return c


def add_static_conditions(net: nn.Module, c: Tensor, batch: int, y: Tensor | None,
                          cond: dict[str, Tensor]) -> Tensor:
    """c + :func:`static_conditions`; c (B, D)."""
    return fold(c, static_conditions(net, batch, y, cond, c.device))


def check_conditioning(kind: str, batch: int, t: Tensor, s: Tensor | None, y: Tensor | None,
                       cond: dict[str, Tensor], *, has_gap: bool, has_guidance: bool, has_labels: bool,
                       num_classes: int, conditions: tuple[str, ...] = ()) -> None:
    """Validate t, s, guidance and labels of a backbone call.

    Args:
        kind: the backbone's name in messages (``DiT``, ``MLP``).
        batch: B, the number of samples in x.
        t, s: (B,) float times; ``s=None`` for a one-time call.
        y: (B,) int labels in [0, num_classes] (num_classes = null), or ``None``.
        cond: extra keyword conditions, each a (B,) float: ``guidance`` and the backbone's ``conditions``.
        has_gap, has_guidance, has_labels: which embedders the backbone has.
        conditions: names of the backbone's extra scalar conditions (config ``conditions``).
    """
    known = (["guidance"] if has_guidance else []) + list(conditions)
    unknown = sorted(set(cond) - set(known) - {"guidance"})
    if unknown:
        accepts = ", ".join(f"{k}=" for k in known) or "no extra conditions"
        raise TypeError(f"unknown conditions {unknown}; the {kind} accepts {accepts}")
    missing = [k for k in conditions if k not in cond]
    if missing:
        raise ValueError(f"missing {', '.join(f'{k}=' for k in missing)}: this {kind} embeds the extra conditions "
                         f"{list(conditions)} (config conditions); pass each as a (B,) float tensor")
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
