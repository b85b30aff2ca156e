"""The DiT's explicit JVP (``DiT(..., tangents=)``) against float64 references: torch.func.jvp for values,
central finite differences for gradients (torch.func.jvp's own gradients through LayerNorm are wrong on
torch 2.13, see ``test_functorch_layer_norm_gradient_is_wrong_and_ours_is_right``), layer rules against
closed forms, the attention JVP against the float64 reference of ``jvp-attention-check.py``, the
custom op's fake kernel (``torch.library.opcheck``), and the routing of objectives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fewstep.backbones import DiT, DiTConfig
from fewstep.backbones import tangents as T
from fewstep.backbones.layers import TimestepEmbedder, rms_norm
from fewstep.kernels.attention import attention_jvp, explicit, kernel_attention, last_path
from fewstep.objectives.jvp import backbone_jvp, functorch_jvp

SWITCHES = {
    "tvm": dict(norm="rmsnorm", qk_norm=True, mod_norm=True, gap_embedder=True, guidance_embedder=True),
    "dit": dict(norm="layernorm", qk_norm=False, mod_norm=False, gap_embedder=True, guidance_embedder=False),
}


def model(kind: str, seed: int = 0, std: float = 0.1) -> DiT:
    torch.manual_seed(seed)
    cfg = DiTConfig(name="dit-debug", depth=2, hidden_size=32, num_heads=2, patch_size=2, **SWITCHES[kind])
    net = DiT(cfg, in_channels=3, input_size=8, num_classes=5).double()
    with torch.no_grad():        # leave the zero (adaLN-Zero) init: every term must be exercised
        for p in net.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))
    return net


def point(net: DiT, B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    s = t * torch.rand(B, generator=g, dtype=torch.float64)
    cond = {"guidance": torch.rand(B, generator=g, dtype=torch.float64)} if net.guidance_embedder else {}
    tangents = (torch.randn(B, 3, 8, 8, generator=g, dtype=torch.float64),
                torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64))
    return x, t, s, torch.tensor([0, 5, 2][:B]), cond, tangents


@pytest.mark.parametrize("kind", ["tvm", "dit"])
@pytest.mark.parametrize("which", ["all", "x", "s"])
def test_values_match_torch_func_jvp(kind, which):
    net = model(kind)
    x, t, s, y, cond, (tx, tt, ts) = point(net)
    tangents = {"all": (tx, tt, ts), "x": (tx, None, None), "s": (None, None, ts)}[which]
    out, tout = net(x, t, s, y=y, tangents=tangents, **cond)
    full = tuple(torch.zeros_like(p) if v is None else v for p, v in zip((x, t, s), tangents))
    ref, tref = torch.func.jvp(lambda a, b, c: net(a, b, c, y=y, **cond), (x, t, s), full)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tout, tref, rtol=1e-10, atol=1e-10)
    assert tout.abs().max() > 1e-3          # a real tangent, not zeros


@pytest.mark.parametrize("kind", ["tvm", "dit"])
def test_gradients_through_primal_and_tangent_match_finite_differences(kind):
    net = model(kind)
    x, t, s, y, cond, tangents = point(net)

    def loss() -> torch.Tensor:
        out, tout = net(x, t, s, y=y, tangents=tangents, **cond)
        return (out.square().sum() + (out * tout).sum() + tout.square().sum()) / 100

    net.zero_grad()
    loss().backward()
    probes = [net.blocks[1].mlp.fc2.bias, net.blocks[0].attn.qkv.weight, net.blocks[0].adaLN_modulation.linear.bias,
              net.t_embedder.mlp[0].weight, net.final_layer.linear.weight]
    h = 1e-6
    for p in probes:
        for i in [0, p.numel() // 2, p.numel() - 1]:
            flat = p.data.view(-1)
            with torch.no_grad():
                flat[i] += h
                up = loss()
                flat[i] -= 2 * h
                down = loss()
                flat[i] += h
            fd = (up - down) / (2 * h)
            assert abs(p.grad.view(-1)[i].item() - fd.item()) <= 1e-6 * max(1.0, abs(fd.item())), (p.shape, i)


def test_functorch_layer_norm_gradient_is_wrong_and_ours_is_right():
    """Documents why LayerNorm DiTs must not train through torch.func.jvp on this torch: the gradient
    of a loss on the tangent through ``F.layer_norm`` differs from finite differences."""
    torch.manual_seed(0)
    x, tx = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    w = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)

    def ours() -> torch.Tensor:
        _, ty = T.layer_norm_jvp(x @ w, tx @ w, 1e-6)
        return ty.square().sum()

    def functorch() -> torch.Tensor:
        _, ty = torch.func.jvp(lambda a: nn.functional.layer_norm(a, (16,), eps=1e-6), (x @ w,), (tx @ w,))
        return ty.square().sum()

    g_ours = torch.autograd.grad(ours(), w)[0]
    g_func = torch.autograd.grad(functorch(), w)[0]
    fd = torch.zeros_like(w)
    h = 1e-6
    with torch.no_grad():
        for i in range(16):
            for j in range(16):
                w[i, j] += h
                up = ours()
                w[i, j] -= 2 * h
                down = ours()
                w[i, j] += h
                fd[i, j] = (up - down) / (2 * h)
    torch.testing.assert_close(g_ours, fd, rtol=1e-6, atol=1e-6)
    if torch.allclose(g_func, fd, rtol=1e-4, atol=1e-4):
        pytest.skip("this torch's functorch LayerNorm gradient is right: the workaround is no longer needed")


def test_layer_rules_against_closed_forms():
    torch.manual_seed(0)
    x, tx = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    eps = 1e-3
    for fn, rule in [(lambda a: a * torch.sigmoid(a), T.silu_jvp),
                     (lambda a: nn.functional.gelu(a, approximate="tanh"), T.gelu_tanh_jvp),
                     (lambda a: rms_norm(a, None), T.rms_norm_jvp)]:
        out, tout = rule(x, tx)
        num = (fn(x + eps * tx) - fn(x - eps * tx)) / (2 * eps)
        torch.testing.assert_close(out, fn(x))
        torch.testing.assert_close(tout, num, rtol=1e-5, atol=1e-5)
    assert T.rms_norm_jvp(x, None)[1] is None and T.add(None, None) is None


def test_timestep_embedder_tangent():
    torch.manual_seed(0)
    emb = TimestepEmbedder(16, scale=3.0).double()
    t, tt = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out, tout = T.timestep_embedder_jvp(emb, t, tt)
    ref, tref = torch.func.jvp(emb, (t,), (tt,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tout, tref)


def _attention_data(dtype=torch.float64, B=2, H=2, N=24, M=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, M, d, generator=g, dtype=dtype) for _ in range(2))
    tq = torch.randn(B, H, N, d, generator=g, dtype=dtype)
    tk, tv = (torch.randn(B, H, M, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, tq, tk, tv


def test_explicit_attention_jvp_matches_functorch():
    q, k, v, tq, tk, tv = _attention_data()
    out, tout = attention_jvp(q, k, v, tq, tk, tv)
    assert last_path() == "explicit"
    ref, tref = torch.func.jvp(explicit, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tout, tref)
    out2, tout2 = attention_jvp(q, k, v, None, None, None)
    assert tout2 is None
    torch.testing.assert_close(out2, ref)


def test_kernel_attention_jvp_op_matches_float64_and_passes_opcheck():
    """The Triton custom op (interpreter on CPU): values and all six gradients against float64, and
    ``torch.library.opcheck`` (fake kernel layouts, autograd registration, schema)."""
    from fewstep.kernels.jvp_ops import _forward

    prims64 = _attention_data()
    go, gt = (torch.randn(2, 2, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9 + i))
              for i in range(2))
    leaves = [p.float().requires_grad_() for p in prims64]
    with kernel_attention():
        out, tout = attention_jvp(*leaves)
    assert last_path() == "triton"
    grads = torch.autograd.grad((out * go.float()).sum() + (tout * gt.float()).sum(), leaves)
    refs = [p.clone().requires_grad_() for p in prims64]
    ref, tref = attention_jvp(*refs)
    rgrads = torch.autograd.grad((ref * go).sum() + (tref * gt).sum(), refs)
    for a, b in zip((out, tout, *grads), (ref, tref, *rgrads)):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)
    args = [p.float().requires_grad_() for p in prims64]
    torch.library.opcheck(_forward, (*args, 0.25, False), test_utils=("test_schema", "test_faketensor",
                                                                      "test_autograd_registration"))


def test_objectives_route_to_the_backbone_rules_and_fall_back():
    net = model("tvm")
    x, t, s, y, cond, tangents = point(net)
    calls = []
    original = type(net).forward

    def spy(self, *a, **kw):
        calls.append("tangents" in kw and kw["tangents"] is not None)
        return original(self, *a, **kw)

    type(net).forward = spy
    try:
        out, tout = backbone_jvp(net, x, t, s, tangents, y=y, **cond)
        with functorch_jvp():
            ref, tref = backbone_jvp(net, x, t, s, tangents, y=y, **cond)
    finally:
        type(net).forward = original
    assert calls == [True, False]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tout, tref)
    _, detached = backbone_jvp(net, x, t, s, tangents, y=y, detach_tangent=True, **cond)
    assert detached.grad_fn is None


def test_activation_checkpointing_gives_the_same_gradients():
    net = model("tvm")
    x, t, s, y, cond, tangents = point(net)
    grads = []
    for on in (False, True):
        net.set_activation_checkpointing(on)
        net.zero_grad()
        out, tout = net(x, t, s, y=y, tangents=tangents, **cond)
        (out.square().sum() + tout.square().sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bad_tangents_are_refused():
    net = model("tvm")
    x, t, s, y, cond, _ = point(net)
    with pytest.raises(ValueError, match="tangent of t must have the shape"):
        net(x, t, s, y=y, tangents=(None, torch.ones(7, dtype=torch.float64), None), **cond)
    with pytest.raises(ValueError, match="triple"):
        net(x, t, s, y=y, tangents=(None, None), **cond)


def test_compiled_blocks_give_the_same_values_and_gradients():
    """Regional torch.compile (every block, forward and tangent graphs) against eager, on a TVM-style
    JVP (tangent only in s) and a plain forward. Guards the contiguous-token fix in ``DiT.tokens``."""
    from fewstep.compiling import compile_objective

    torch.manual_seed(0)
    cfg = DiTConfig(name="dit-debug", depth=2, hidden_size=32, num_heads=2, patch_size=2, **SWITCHES["tvm"])
    net = DiT(cfg, in_channels=3, input_size=8, num_classes=5)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x, t, s, y, cond, _ = (v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for v in point(model("tvm")))
    cond = {k: v.float() for k, v in cond.items()}

    def run():
        net.zero_grad()
        out, tout = net(x, t, s, y=y, tangents=(None, None, torch.ones_like(s)), **cond)
        plain = net(x, t, s, y=y, **cond)
        (out.square().sum() + tout.square().sum() + (plain * out).sum()).backward()
        return [out.detach(), tout.detach()] + [p.grad.clone() for p in net.parameters() if p.grad is not None]

    eager = run()
    assert compile_objective(nn.ModuleDict({"backbone": net})) == 2
    compiled = run()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
