"""Triton JVP flash attention against float64 references (CPU: Triton interpreter, fp32 and fp16).

The reference is independent of the kernel's formulas: ``torch.func.jvp`` of naive attention followed
by ``torch.autograd.grad`` of ``⟨gO, O⟩ + ⟨gT, tO⟩``, in float64. The error budget follows
flash-attention's own tests: the kernel's max error may be at most about twice that of the same
PyTorch reference run in the kernel's precision (plus a floor of a few ulps of the largest value,
for cases where PyTorch happens to be nearly exact).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from fewstep.kernels.jvp_launch import HeadDim, attention_backward, attention_forward, natural_lse  # noqa: E402

GRADS = ("q", "k", "v", "tq", "tk", "tv")
FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4}   # relative to max |reference|: ~8 fp32 ulps, ~0.4 fp16 ulp


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def causal_mask(N, M, device):
    return torch.ones(N, M, dtype=torch.bool, device=device).tril(M - N)


def naive(q, k, v, scale, causal):
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.softmax(s, -1) @ v


def reference(prims, tans, go, gt, scale, causal, dtype):
    """O, tO, LSE, μ and the six gradients, computed by PyTorch autograd in ``dtype``. Causal rows with
    no visible key (N > M) are solved as the sub-problem of the visible rows; theirs are zero."""
    N, M = prims[0].shape[-2], prims[1].shape[-2]
    skip = max(N - M, 0) if causal else 0
    P = [x.to(dtype).requires_grad_() for x in prims]
    T = [x.to(dtype).requires_grad_() for x in tans]
    sub = lambda x: x[..., skip:, :]  # noqa: E731
    fn = lambda q, k, v: naive(q, k, v, scale, causal)  # noqa: E731
    o, to = torch.func.jvp(fn, (sub(P[0]), P[1], P[2]), (sub(T[0]), T[1], T[2]))
    loss = (o.double() * sub(go)).sum() + (to.double() * sub(gt)).sum()
    grads = torch.autograd.grad(loss, P + T, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, P + T)]
    pad = lambda x: torch.cat([x.new_zeros(*x.shape[:-2], skip, x.shape[-1]), x], -2)  # noqa: E731
    with torch.no_grad():
        lse_fn = lambda q, k: torch.logsumexp(  # noqa: E731
            (scale * q @ k.transpose(-1, -2)).masked_fill(
                ~causal_mask(q.shape[-2], M, q.device) if causal else
                torch.zeros(1, dtype=torch.bool, device=q.device), float("-inf")), -1)
        lse, mu = torch.func.jvp(lse_fn, (sub(P[0]), P[1]), (sub(T[0]), T[1]))
    return dict(o=pad(o.detach()).double(), to=pad(to.detach()).double(), lse=lse.double(), mu=mu.double(),
                **{f"d{n}": g.double() for n, g in zip(GRADS, grads)}, skip=skip)


def inputs(B, H, N, M, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    return [r(N), r(M), r(M)], [r(N), r(M), r(M)], r(N), r(N)


def kernel_outputs(prims, tans, go, gt, scale, causal, dtype, has_go=True, has_gt=True):
    P = [x.to(dtype) for x in prims]
    T = [x.to(dtype) for x in tans]
    o, to, lse, mu = attention_forward(*P, *T, scale=scale, causal=causal)
    grads = attention_backward(*P, *T, o, to, lse, mu, go.to(dtype) if has_go else None,
                               gt.to(dtype) if has_gt else None, scale=scale, causal=causal)
    return dict(o=o, to=to, lse=lse, mu=mu, **{f"d{n}": g for n, g in zip(GRADS, grads)})


def assert_within_budget(got, ref64, ref_low, dtype, names):
    for name in names:
        g = got[name]
        err = (g.double() - ref64[name]).abs().max().item()
        budget = 2 * (ref_low[name] - ref64[name]).abs().max().item() + FLOOR[dtype] * ref64[name].abs().max().item()
        assert err <= budget, f"{name}: kernel error {err:.3g} exceeds 2× PyTorch's {dtype} error (budget {budget:.3g})"


CASES = [  # B, H, N, M, d, causal
    (2, 3, 37, 29, 16, False),     # rectangular, odd sizes, several query and key tiles
    (1, 2, 33, 45, 64, True),      # causal, M > N (bottom-right aligned)
    (1, 2, 21, 19, 72, False),     # d = 72 as 64 + 16
    (1, 1, 18, 17, 128, False),
    (1, 2, 40, 23, 16, True),      # causal with N > M: 17 fully masked rows
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,H,N,M,d,causal", CASES)
def test_forward_and_backward_match_float64(B, H, N, M, d, causal, dtype, device):
    prims, tans, go, gt = inputs(B, H, N, M, d, device=device)
    scale = 1 / math.sqrt(d)
    ref64 = reference(prims, tans, go, gt, scale, causal, torch.float64)
    ref_low = reference(prims, tans, go, gt, scale, causal, dtype)
    got = kernel_outputs(prims, tans, go, gt, scale, causal, dtype)
    assert got["o"].dtype == got["to"].dtype == dtype and got["lse"].dtype == got["mu"].dtype == torch.float32
    assert got["o"].shape == got["to"].shape == (B, H, N, d) and got["lse"].shape == (B, H, N, 2)
    assert_within_budget(got, ref64, ref_low, dtype, ["o", "to"] + [f"d{n}" for n in GRADS])
    skip = ref64["skip"]
    lse, mu = natural_lse(got["lse"])[..., skip:], got["mu"][..., skip:].double()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(lse, ref64["lse"], atol=tol, rtol=0)
    torch.testing.assert_close(mu, ref64["mu"], atol=tol * 4, rtol=0)
    if skip:   # fully masked rows: zero outputs and gradients, LSE = +inf, μ = 0, nothing NaN
        assert torch.isinf(natural_lse(got["lse"])[..., :skip]).all() and (got["lse"][..., :skip, 0] > 0).all()
        assert (got["o"][..., :skip, :] == 0).all() and (got["to"][..., :skip, :] == 0).all()
        assert (got["mu"][..., :skip] == 0).all() and (got["dq"][..., :skip, :] == 0).all()
    for name in got:
        assert torch.isfinite(got[name][..., skip:, :] if got[name].dim() == 4 else got[name][..., skip:]).all(), name
    assert torch.isfinite(got["mu"]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_go,has_gt", [(True, False), (False, True)], ids=["gO-only", "gT-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_each_upstream_gradient_alone(has_go, has_gt, dtype, device):
    prims, tans, go, gt = inputs(2, 2, 27, 35, 72, seed=1, device=device)
    go, gt = (go if has_go else torch.zeros_like(go)), (gt if has_gt else torch.zeros_like(gt))
    scale = 0.3
    ref64 = reference(prims, tans, go, gt, scale, False, torch.float64)
    ref_low = reference(prims, tans, go, gt, scale, False, dtype)
    got = kernel_outputs(prims, tans, go, gt, scale, False, dtype, has_go, has_gt)
    if has_gt:
        assert_within_budget(got, ref64, ref_low, dtype, [f"d{n}" for n in GRADS])
    else:   # gO only is the flash-attention backward; tangent gradients are absent (exactly zero)
        assert got["dtq"] is None and got["dtk"] is None and got["dtv"] is None
        assert_within_budget(got, ref64, ref_low, dtype, ["dq", "dk", "dv"])
        assert (ref64["dtq"] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_primal_only_and_tangent_only_passes_agree_with_fused(device):
    prims, tans, *_ = inputs(1, 2, 29, 31, 40, seed=2, device=device)
    P = [x.float() for x in prims]
    T = [x.float() for x in tans]
    o, to, lse, mu = attention_forward(*P, *T, scale=0.2, causal=True)
    o1, none_to, lse1, none_mu = attention_forward(*P, scale=0.2, causal=True)
    assert none_to is None and none_mu is None
    torch.testing.assert_close(o1, o, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse1, lse, atol=1e-6, rtol=0)
    _, to2, _, mu2 = attention_forward(*P, *T, scale=0.2, causal=True, o=o1, lse=lse1)
    torch.testing.assert_close(to2, to, atol=2e-6, rtol=0)
    torch.testing.assert_close(mu2, mu, atol=2e-6, rtol=0)


def test_strided_operands_and_output_layout():
    """Permuted views (as the DiT's fused qkv gives) need no copy; outputs are stored (B, N, H, d)."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 13, 3, 4, 24, generator=g).permute(2, 0, 3, 1, 4)     # (3, B, H, N, d), strided
    tqkv = torch.randn(2, 13, 3, 4, 24, generator=g).permute(2, 0, 3, 1, 4)
    o, to, _, _ = attention_forward(*qkv, *tqkv, scale=0.25)
    o_c, to_c, _, _ = attention_forward(*(x.contiguous() for x in qkv), *(x.contiguous() for x in tqkv), scale=0.25)
    assert torch.equal(o, o_c) and torch.equal(to, to_c)
    assert o.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("d,chunks", [(8, (16, False)), (16, (16, False)), (64, (64, False)), (72, (64, True)),
                                      (96, (64, True)), (128, (128, False))])
def test_head_dim_chunks(d, chunks):
    hd = HeadDim.of(d)
    assert (hd.D0, hd.has_d1) == chunks and hd.D0 + (hd.D1 if hd.has_d1 else 0) < 2 * max(d, 16)
    if d == 72:
        assert hd.D0 + hd.D1 == 80   # 11 % padding, not 128
    with pytest.raises(ValueError, match="head dims"):
        HeadDim.of(300)
