"""Multi-head attention: the single switch point every backbone calls.

Three paths compute the same function ``O = softmax(scale · Q Kᵀ) V``:

* ``sdpa`` — :func:`torch.nn.functional.scaled_dot_product_attention` (fused flash / memory-efficient
  kernels). None of PyTorch's fused SDPA kernels has a forward-AD formula, so this path cannot run
  under ``torch.func.jvp`` or with ``torch.autograd.forward_ad`` dual tensors.
* ``explicit`` — scores, softmax and the value product written out with N×M intermediates, computed
  in (at least) fp32 with autocast off and returned in the input dtype. It supports forward-AD, and
  backward through both the primal and the tangent output (what TVM's ``detach_jvp: false`` needs),
  under fp32 and bf16 autocast alike. The softmax is spelled out (``exp(S − max S) / Σ``) because
  backward through the native softmax's forward-AD rule fails with dual tensors on torch 2.13
  (pytorch#162350); the shift is exact, so primal, tangent and gradients are unchanged.

* ``triton`` — the fused Triton JVP flash-attention kernels (:mod:`fewstep.kernels.jvp_attention`):
  O(N·d) memory, forward-AD rule, backward through primal and tangent. Used under forward-AD on CUDA.

Routing is automatic: under forward-AD (detected from the inputs, see :func:`uses_forward_ad`) CUDA
tensors take the ``triton`` path and others the ``explicit`` one; otherwise SDPA.
:func:`explicit_attention` forces the explicit path, :func:`kernel_attention` the Triton one (on CPU
only with ``TRITON_INTERPRET=1``, for tests). Inside :func:`detached_tangents` the Triton path builds
no graph for tangents (stop-gradient JVP targets).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

Path = Literal["sdpa", "explicit", "triton"]

_force_explicit = 0           # depth of nested explicit_attention(True) contexts
_force_kernel = 0             # depth of nested kernel_attention(True) contexts
_last_path: Path | None = None
_triton_ok: bool | None = None


@contextlib.contextmanager
def kernel_attention(enabled: bool = True) -> Iterator[None]:
    """Use the Triton path for every forward-AD :func:`attention` call in this block, whatever the
    device (CPU tensors need ``TRITON_INTERPRET=1`` set before the first kernel import). Nests."""
    global _force_kernel
    _force_kernel += int(enabled)
    try:
        yield
    finally:
        _force_kernel -= int(enabled)


@contextlib.contextmanager
def detached_tangents(enabled: bool = True) -> Iterator[None]:
    """Tangents from the Triton path carry no graph in this block (stop-gradient JVP targets: less
    memory, no backward through the tangent). The explicit path is unaffected (detach its output)."""
    if not enabled:
        yield
        return
    from fewstep.kernels.jvp_attention import detached_tangents as inner

    with inner():
        yield


def triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except Exception:  # ImportError, or a broken install
            _triton_ok = False
    return _triton_ok


def _in_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active. False while Dynamo traces: it cannot call the
    functorch interpreter stack (the call would break every compiled block's graph at its attention),
    and Dynamo traces functorch transforms itself rather than running a compiled region inside one."""
    if torch.compiler.is_compiling():
        return False
    interpreters = torch._C._functorch.get_interpreter_stack() or []
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in interpreters)


def _kernel_fits(q: Tensor, k: Tensor, v: Tensor, *, compiled_ok: bool = False) -> bool:
    """The Triton kernel handles these operands: 4-D (B, H, L, d), equal head dims and head counts,
    d ≤ 256, a floating dtype it supports (float64 stays explicit), outside vmap; and outside a
    ``torch.compile`` trace unless ``compiled_ok`` (the custom op compiles, the forward-AD Function not)."""
    return (q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] == v.shape[-1] and q.shape[:2] == k.shape[:2]
            and q.shape[-1] <= 256 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and (compiled_ok or not torch.compiler.is_compiling()) and not _in_vmap() and triton_available())


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

    Routing: under forward-AD (``torch.func.jvp``, dual tensors) the Triton kernel for CUDA tensors
    (or inside :func:`kernel_attention`) and the explicit path otherwise; the explicit path inside
    :func:`explicit_attention`; otherwise fused SDPA. :func:`last_path` reports the choice.
    """
    global _last_path
    if not (q.dim() == k.dim() == v.dim() >= 2 and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        raise ValueError(f"attention expects q (B, H, N, d), k (B, H, M, d), v (B, H, M, d_v), got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if _force_explicit > 0:
        _last_path = "explicit"
        return explicit(q, k, v, scale=scale)
    if uses_forward_ad(q, k, v):
        if (q.is_cuda or _force_kernel > 0) and _kernel_fits(q, k, v):
            from fewstep.kernels.jvp_attention import flash_attention

            _last_path = "triton"
            return flash_attention(q, k, v, scale=scale)
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


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None,
                  tv: Tensor | None, *, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Attention and its tangent for callers that carry tangents themselves (explicit JVPs).

    Args:
        q, k, v: (B, H, N, d), (B, H, M, d), (B, H, M, d).
        tq, tk, tv: their tangents, same shapes (``None`` = zero; all ``None`` gives tO = ``None``).
    Returns:
        (O, tO), (B, H, N, d) in the dtype of ``q`` (the autocast dtype on the kernel path).

    CUDA tensors (or any inside :func:`kernel_attention`) take the fused Triton kernel, registered as a
    custom op so ``torch.compile`` traces through it; others the explicit fp32 formulas
    S = scale·QKᵀ, P = softmax S, O = PV, tS = scale·(tQ Kᵀ + Q tKᵀ), tP = P ⊙ (tS − Σ_j P tS),
    tO = tP V + P tV. Both are differentiable w.r.t. all six inputs.
    """
    global _last_path
    if tq is None and tk is None and tv is None:
        return attention(q, k, v, scale=scale), None
    tq, tk, tv = (torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), (tq, tk, tv)))
    if (q.is_cuda or _force_kernel > 0) and _kernel_fits(q, k, v, compiled_ok=True) and _force_explicit == 0:
        from fewstep.kernels.jvp_ops import jvp_attention_op

        _last_path = "triton"
        return jvp_attention_op(q, k, v, tq, tk, tv, scale=scale)
    _last_path = "explicit"
    return explicit_jvp(q, k, v, tq, tk, tv, scale=scale)


def explicit_jvp(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, *,
                 scale: float | None = None) -> tuple[Tensor, Tensor]:
    """(O, tO) by the formulas of :func:`attention_jvp`, in ≥ fp32 with autocast off (O(N·M) memory)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    device = q.device.type
    off = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
           else contextlib.nullcontext())
    with off:
        q, k, v, tq, tk, tv = (x.to(compute) for x in (q, k, v, tq, tk, tv))
        s = (q @ k.transpose(-1, -2)) * scale
        e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
        p = e / e.sum(dim=-1, keepdim=True)
        ts = (tq @ k.transpose(-1, -2) + q @ tk.transpose(-1, -2)) * scale
        tp = p * (ts - (p * ts).sum(dim=-1, keepdim=True))
        out, tout = p @ v, tp @ v + p @ tv
    return out.to(dtype), tout.to(dtype)
