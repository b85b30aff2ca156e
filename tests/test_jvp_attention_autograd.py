"""Autograd wiring of the Triton JVP attention (CPU: Triton interpreter): torch.func.jvp, dual tensors,
detached tangents, the explicit 6-in/2-out op, routing, and a TVM loss gradient through a DiT that is
the same on the kernel path and the math path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

pytest.importorskip("triton")
from fewstep.kernels.attention import kernel_attention, last_path  # noqa: E402
from fewstep.kernels.jvp_attention import detached_tangents, flash_attention, jvp_attention  # noqa: E402


def naive(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 2, 19, 24, generator=g, dtype=torch.float64) for _ in range(8)]
    return xs[:3], xs[3:6], xs[6], xs[7]


def grads_of(fn, prims, tans, go, gt, dtype):
    P = [p.to(dtype).requires_grad_() for p in prims]
    T = [t.to(dtype).requires_grad_() for t in tans]
    o, to = fn(P, T)
    g = torch.autograd.grad((o.double() * go).sum() + (to.double() * gt).sum(), P + T)
    return [o.double(), to.double(), *(x.double() for x in g)]


def func_jvp(fn):
    return lambda P, T: torch.func.jvp(fn, tuple(P), tuple(T))


def dual(P, T):
    with fwAD.dual_level():
        o, to = fwAD.unpack_dual(flash_attention(*(fwAD.make_dual(p, t) for p, t in zip(P, T))))
    return o, to


@pytest.mark.parametrize("path", ["func.jvp", "dual", "explicit-op"])
def test_gradients_through_primal_and_tangent_match_float64(data, path):
    prims, tans, go, gt = data
    ref = grads_of(func_jvp(naive), prims, tans, go, gt, torch.float64)
    fn = {"func.jvp": func_jvp(flash_attention), "dual": dual,
          "explicit-op": lambda P, T: jvp_attention(*P, *T)}[path]
    got = grads_of(fn, prims, tans, go, gt, torch.float32)
    for name, a, b in zip(["O", "tO", "q", "k", "v", "tq", "tk", "tv"], got, ref):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=0, msg=name)


def test_plain_forward_is_valid_attention(data):
    """No JVP: the primal alone is flash attention (never an unfilled buffer), with its gradients."""
    (q, k, v), _, go, _ = data
    P = [x.float().requires_grad_() for x in (q, k, v)]
    o = flash_attention(*P)
    g = torch.autograd.grad((o.double() * go).sum(), P)
    R = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = naive(*R)
    gr = torch.autograd.grad((ref * go).sum(), R)
    torch.testing.assert_close(o.double(), ref.detach(), atol=2e-6, rtol=0)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, atol=5e-6, rtol=0)


def test_detached_tangents_build_no_graph(data):
    prims, tans, *_ = data
    P = [p.float().requires_grad_() for p in prims]
    T = [t.float().requires_grad_() for t in tans]
    with detached_tangents():
        o, to = torch.func.jvp(flash_attention, tuple(P), tuple(T))
    _, to_ref = torch.func.jvp(naive, tuple(prims), tuple(tans))
    assert o.requires_grad and to.grad_fn is None and not to.requires_grad
    torch.testing.assert_close(to.double(), to_ref, atol=2e-6, rtol=0)


def test_routing_takes_the_kernel_under_jvp(data):
    from fewstep.kernels.attention import attention

    prims, tans, *_ = data
    P, T = [p.float() for p in prims], [t.float() for t in tans]
    torch.func.jvp(attention, tuple(P), tuple(T))
    assert last_path() == "explicit"          # CPU default: the math path
    with kernel_attention():
        torch.func.jvp(attention, tuple(P), tuple(T))
        assert last_path() == "triton"
        attention(*P)
        assert last_path() == "sdpa"          # no JVP: fused SDPA as before


@pytest.mark.parametrize("jvp_path", ["explicit", "functorch"])
def test_tvm_loss_gradient_through_a_dit_is_the_same_on_both_paths(monkeypatch, jvp_path):
    """The issue's end-to-end check: TVM's loss (JVP with gradient through the tangent) on a DiT, with
    the DiT's own tangent rules (kernel as a custom op) and through torch.func.jvp (kernel's jvp rule)."""
    import fewstep.kernels.jvp_attention as kernel_module
    import fewstep.kernels.jvp_ops as op_module
    from fewstep.objectives.jvp import functorch_jvp
    from fewstep.testing import TINY_SPEC, tiny_dit, tiny_objective

    calls = []
    module, name = (op_module, "jvp_attention_op") if jvp_path == "explicit" else (kernel_module, "flash_attention")
    monkeypatch.setattr(module, name, lambda *a, _f=getattr(module, name), **kw: calls.append(1) or _f(*a, **kw))

    torch.manual_seed(0)
    x = torch.randn(4, TINY_SPEC.channels, TINY_SPEC.resolution, TINY_SPEC.resolution)
    y = torch.tensor([0, 1, 2, 1])
    results = []
    for use_kernel in (False, True):
        obj = tiny_objective("tvm", backbone=tiny_dit(hidden_size=64, num_heads=2), seed=1)
        with kernel_attention(use_kernel), functorch_jvp(jvp_path == "functorch"):
            out = obj(x, y, torch.Generator().manual_seed(3), nimg=0)
            out.loss.backward()
        assert (len(calls) > 0) == use_kernel      # the JVP went through the kernel exactly when asked
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}))
    (loss_math, g_math), (loss_kernel, g_kernel) = results
    torch.testing.assert_close(loss_kernel, loss_math, atol=1e-5, rtol=1e-5)
    assert g_math.keys() == g_kernel.keys() and any("attn" in n for n in g_math)
    for name in g_math:
        torch.testing.assert_close(g_kernel[name], g_math[name], atol=1e-5, rtol=1e-4, msg=name)
