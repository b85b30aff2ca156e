"""Multi-head attention: the single switch point every backbone calls.

Two paths compute the same function ``O = softmax(scale · Q Kᵀ) V``:

* ``sdpa`` — :func:`torch.nn.functional.scaled_dot_product_attention` (fused flash / memory-efficient
  kernels). None of PyTorch's fused SDPA kernels has a forward-AD formula, so this path cannot run
  under ``torch.func.jvp`` or with ``torch.autograd.forward_ad`` dual tensors.
* ``explicit`` — scores, softmax and the value product written out with N×M intermediates, computed
  in (at least) fp32 with autocast off and returned in the input dtype. It supports forward-AD, and
  backward through both the primal and the tangent output (what TVM's ``detach_jvp: false`` needs),
  under fp32 and bf16 autocast alike. The softmax is spelled out (``exp(S − max S) / Σ``) because
  backward through the native softmax's forward-AD rule fails with dual tensors on torch 2.13
  (pytorch#162350); the shift is exact, so primal, tangent and gradients are unchanged.

Routing is automatic: forward-AD is detected from the inputs (see :func:`uses_forward_ad`), and
:func:`explicit_attention` forces the explicit path. A fused Triton JVP kernel plugs in here later,
in place of the explicit path, without any backbone changing.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

Path = Literal["sdpa", "explicit"]

_force_explicit = 0           # depth of nested explicit_attention(True) contexts
_last_path: Path | None = None


@contextlib.contextmanager
def explicit_attention(enabled: bool = True) -> Iterator[None]:
    """Force the explicit path for every :func:`attention` call in this block (``enabled=False``
    is a no-op, so call sites can pass a flag). Nests; not thread-local."""
    global _force_explicit
    _force_explicit += int(enabled)
    try:
        yield
    finally:
        _force_explicit -= int(enabled)


def last_path() -> Path | None:
    """The path taken by the most recent :func:`attention` call in this process (``None`` before
    the first call). Meant for tests and diagnostics."""
    return _last_path


def uses_forward_ad(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` may carry a forward-AD tangent.

    True inside ``torch.func.jvp`` / ``torch.func.linearize`` and for ``forward_ad`` dual tensors
    whose tangent reaches the inputs. Cheap when no forward-AD level is open (the normal case).
    Where the tangent cannot be inspected (e.g. ``vmap`` nested inside ``jvp``) it answers True,
    which only costs speed.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace the functorch stack; a dual level is a global
        return fwAD._current_level >= 0
    interpreters = torch._C._functorch.get_interpreter_stack() or []
    in_jvp = any(i.key() == torch._C._functorch.TransformType.Jvp for i in interpreters)
    if not in_jvp and fwAD._current_level < 0:
        return False
    for x in tensors:
        try:
            if fwAD.unpack_dual(x).tangent is not None:
                return True
        except RuntimeError:  # unpack_dual has no batching rule: assume a tangent
            return True
    return False


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Scaled dot-product attention, without mask or dropout.

    Args:
        q: queries (B, H, N, d).
        k: keys (B, H, M, d); M may differ from N.
        v: values (B, H, M, d_v).
        scale: logit scale; default ``1/√d``.
        Any number of leading dims works in place of (B, H) (e.g. under ``vmap``).

    Returns:
        (B, H, N, d_v) in the dtype of ``q``.

    Routing: the explicit path under forward-AD (``torch.func.jvp``, dual tensors) or inside
    :func:`explicit_attention`; otherwise fused SDPA. :func:`last_path` reports the choice.
    """
    global _last_path
    if not (q.dim() == k.dim() == v.dim() >= 2 and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        raise ValueError(f"attention expects q (B, H, N, d), k (B, H, M, d), v (B, H, M, d_v), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if _force_explicit > 0 or uses_forward_ad(q, k, v):
        _last_path = "explicit"
        return explicit(q, k, v, scale=scale)
    _last_path = "sdpa"
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def explicit(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """The explicit path, always (shapes as :func:`attention`).

    Scores, softmax and ``P V`` run in fp32 (float64 stays float64) with autocast off; the result is
    cast back to ``q.dtype``. Memory is O(B·H·N·M).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    device = q.device.type
    off = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
           else contextlib.nullcontext())
    with off:
        s = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale        # (B, H, N, M)
        e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
        p = e / e.sum(dim=-1, keepdim=True)
        out = p @ v.to(compute)
    return out.to(q.dtype)
