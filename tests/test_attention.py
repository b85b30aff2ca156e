"""The attention switch point: both paths agree, forward-AD routing, JVP and backward through it."""
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fewstep.kernels.attention import attention, explicit, explicit_attention, last_path


def qkv(B=2, H=3, N=17, M=11, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=dtype) for n in (N, M, M))


def reference(q, k, v, scale=None):
    """Naive attention with the native softmax (independent of the code under test)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


@pytest.mark.parametrize("scale", [None, 0.3])
def test_explicit_matches_sdpa(scale):
    q, k, v = qkv()
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(attention(q, k, v, scale=scale), sdpa, atol=1e-6, rtol=1e-5)
    assert last_path() == "sdpa"
    with explicit_attention():
        out = attention(q, k, v, scale=scale)
        assert last_path() == "explicit"
    torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=1e-5)
    with explicit_attention(False):
        attention(q, k, v)
        assert last_path() == "sdpa"


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = qkv(d=16)
    torch.testing.assert_close(attention(q, k, v), reference(q, k, v, 0.25))
    assert not torch.allclose(attention(q, k, v, scale=1.0), reference(q, k, v, 0.25))


def test_routing_under_forward_ad():
    q, k, v = qkv()
    tq, tk, tv = qkv(seed=1)
    attention(q, k, v)
    assert last_path() == "sdpa"
    torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    assert last_path() == "explicit"
    # inside jvp, inputs that carry no tangent can still use the fused kernel
    torch.func.jvp(lambda a: attention(q, k, v) + a, (q,), (tq,))
    assert last_path() == "sdpa"
    with fwAD.dual_level():
        attention(fwAD.make_dual(q, tq), k, v)
        assert last_path() == "explicit"
        attention(q, k, v)                      # a dual level is open but q, k, v are plain
        assert last_path() == "sdpa"
    # vmap nested in jvp: the tangent cannot be inspected, so the explicit path is taken
    out, tan = torch.func.jvp(lambda a: torch.func.vmap(attention)(a, k, v), (q,), (tq,))
    assert last_path() == "explicit"
    torch.testing.assert_close(out, reference(q, k, v))


def test_sdpa_itself_has_no_forward_ad():
    """Why the explicit path exists; if PyTorch gains the rule, the routing can be revisited."""
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), qkv(seed=1))


def test_jvp_matches_finite_differences():
    q, k, v = qkv(N=9, M=7, d=4, dtype=torch.float64)
    tangents = qkv(N=9, M=7, d=4, dtype=torch.float64, seed=1)
    out, tan = torch.func.jvp(attention, (q, k, v), tangents)
    h = 1e-6
    plus = reference(*(x + h * t for x, t in zip((q, k, v), tangents)))
    minus = reference(*(x - h * t for x, t in zip((q, k, v), tangents)))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-12, rtol=0)
    torch.testing.assert_close(tan, (plus - minus) / (2 * h), atol=1e-8, rtol=0)
    with fwAD.dual_level():
        dual_tan = fwAD.unpack_dual(attention(*map(fwAD.make_dual, (q, k, v), tangents))).tangent
    torch.testing.assert_close(dual_tan, tan, atol=1e-12, rtol=0)


def grads_through_jvp(mode, dtype, autocast):
    """Gradients of ⟨gO, O⟩ + ⟨gT, tO⟩ w.r.t. the six inputs (q, k, v, tq, tk, tv)."""
    leaves = [x.to(dtype).requires_grad_(True) for x in (*qkv(), *qkv(seed=1))]
    go, gt = qkv(N=17, M=17, seed=2)[:2]
    cast = (lambda x: x.to(torch.bfloat16)) if autocast else (lambda x: x)

    def f(q, k, v):
        return attention(cast(q), cast(k), cast(v)) if mode != "reference" else reference(q, k, v)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if mode == "dual":
            with fwAD.dual_level():
                o, to = fwAD.unpack_dual(f(*map(fwAD.make_dual, leaves[:3], leaves[3:])))
        else:
            o, to = torch.func.jvp(f, tuple(leaves[:3]), tuple(leaves[3:]))
        if mode != "reference":
            assert last_path() == "explicit"
            assert o.dtype == to.dtype == (torch.bfloat16 if autocast else dtype)
        loss = (go.to(o.dtype) * o).float().sum() + (gt.to(to.dtype) * to).float().sum()
    loss.backward()
    return [x.grad for x in leaves]


@pytest.mark.parametrize("mode", ["func", "dual"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_backward_through_primal_and_tangent(mode, autocast):
    want = grads_through_jvp("reference", torch.float64, False)
    got = grads_through_jvp(mode, torch.float32, autocast)
    for name, g, w in zip(["q", "k", "v", "tq", "tk", "tv"], got, want):
        assert g is not None and torch.isfinite(g).all(), name
        err = ((g.double() - w).norm() / w.norm()).item()
        assert err < (2e-2 if autocast else 1e-5), f"grad {name}: relative error {err:.2e}"


def test_explicit_keeps_dtype_and_bad_shapes():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert explicit(q, k, v).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"got q \(2, 3, 17, 8\), k \(2, 3, 11, 4\)"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match=r"v \(3, 11, 8\)"):
        attention(q, k, v[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_jvp_backward_at_dit_shapes():
    """DiT-XL/2-256 head shape (N 256, d 64) on CUDA under bf16 autocast: ``torch.func.jvp`` routes to
    the Triton JVP kernel, whose JVP + backward through both outputs matches a float64 reference, and
    plain calls go to fused SDPA, which agrees."""
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(4, 6, 256, 64, device="cuda", generator=g, requires_grad=True) for _ in range(6)]
    go, gt = (torch.randn(4, 6, 256, 64, device="cuda", generator=g) for _ in range(2))

    def run(kind):
        for x in leaves:
            x.grad = None
        if kind == "reference":
            f, ctx, prim, tan = reference, torch.autocast("cuda", enabled=False), leaves[:3], leaves[3:]
            prim, tan = [x.double() for x in prim], [x.double() for x in tan]
        else:
            f, ctx, prim, tan = attention, torch.autocast("cuda", dtype=torch.bfloat16), leaves[:3], leaves[3:]
            prim, tan = [x.bfloat16() for x in prim], [x.bfloat16() for x in tan]
        with ctx:
            o, to = torch.func.jvp(f, tuple(prim), tuple(tan))
            ((go * o.float()).sum() + (gt * to.float()).sum()).backward()
        return o.float(), to.float(), [x.grad.clone() for x in leaves]

    o_ref, to_ref, g_ref = run("reference")
    o, to, grads = run("bf16")
    assert last_path() == "triton"     # CUDA tensors under forward-AD, a head size the kernel takes
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(o, o_ref) < 1e-2 and rel(to, to_ref) < 2e-2
    for name, a, b in zip(["q", "k", "v", "tq", "tk", "tv"], grads, g_ref):
        assert rel(a, b) < 3e-2, name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = attention(*[x.detach().bfloat16() for x in leaves[:3]])
        assert last_path() == "sdpa"
    assert rel(fused.float(), o_ref) < 1e-2
