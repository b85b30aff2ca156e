"""``fewstep bench attention``: the Triton JVP flash-attention kernels against PyTorch, same process.

Protocol of ``docs/design/jvp-attention.md`` §5.8. Per shape (B, H, N, d), bf16 by default, non-causal unless
marked: our fused forward (O, tO), backward through both outputs, gT-only and gO-only backward, the
whole step (forward + backward through both), and the ``torch.func.jvp`` adapter path end to end;
next to PyTorch's math-SDPA JVP step (skipped when its N² buffers would not fit) and flash SDPA's
primal forward + backward. Times are medians of CUDA-event timings (``triton.testing.do_bench``);
"wall" is host time per call of back-to-back steps, which exposes launch overhead.
TFLOP/s use the §1.5 convention: F = 4·B·H·N·M·d (halved when causal), forward 3F, backward 7.5F,
gT-only backward 6.5F, step 10.5F, flash primal forward + backward 3.5F.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

DIT_SHAPES = [(32, 16, 256, 72, False), (32, 18, 256, 64, False), (8, 16, 1024, 72, False), (8, 18, 1024, 64, False)]
LONG_SHAPES = [(4, 16, 4096, 64, False), (4, 16, 4096, 128, False), (2, 16, 8192, 64, False),
               (1, 16, 16384, 64, False), (1, 16, 16384, 128, False), (4, 16, 4096, 64, True)]
SHAPE_SETS = {"dit": DIT_SHAPES, "long": LONG_SHAPES, "all": DIT_SHAPES + LONG_SHAPES}


@dataclass
class Row:
    """One shape's measurements: times in ms, memory in GiB, errors relative to max |reference|."""

    shape: tuple
    flops_f: float
    ms: dict = field(default_factory=dict)
    wall_ms: dict = field(default_factory=dict)
    peak_gib: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    def tflops(self, name: str, multiple: float) -> float:
        return multiple * self.flops_f / (self.ms[name] * 1e-3) / 1e12


def _median_ms(fn, reps: int, warmup: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=reps, return_mode="median")


def _wall_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _errors(shape, dtype) -> dict:
    """Relative max errors (÷ max |ref|) of O, tO and the six gradients against float64, on one
    batch element and at most 4 heads (N ≤ 4096 only: the reference is O(N²))."""
    from fewstep.kernels.jvp_attention import flash_attention, jvp_attention

    B, H, N, d, causal = shape
    if N > 4096:
        return {}
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(1, min(H, 4), N, d, device="cuda", dtype=torch.float64, generator=g) for _ in range(8)]
    prims, tans, go, gt = xs[:3], xs[3:6], xs[6], xs[7]

    def run(fn, dt):
        P = [x.to(dt).requires_grad_() for x in prims]
        T = [x.to(dt).requires_grad_() for x in tans]
        o, to = fn(P, T)
        grads = torch.autograd.grad((o.double() * go).sum() + (to.double() * gt).sum(), P + T)
        return [o.double(), to.double(), *(x.double() for x in grads)]

    def naive(P, T):
        def attn(q, k, v):
            s = q @ k.transpose(-1, -2) / math.sqrt(d)
            if causal:
                s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device="cuda").tril(), float("-inf"))
            return torch.softmax(s, -1) @ v
        return torch.func.jvp(attn, tuple(P), tuple(T))

    ref = run(naive, torch.float64)
    ours = run(lambda P, T: jvp_attention(*P, *T, causal=causal), dtype)
    adapter = run(lambda P, T: torch.func.jvp(lambda a, b, c: flash_attention(a, b, c, causal=causal),
                                              tuple(P), tuple(T)), dtype)
    torch_low = run(naive, dtype)
    names = ["O", "tO", "dq", "dk", "dv", "dtq", "dtk", "dtv"]
    rel = lambda a, r: ((a - r).abs().max() / r.abs().max()).item()  # noqa: E731
    out = {n: (rel(a, r), rel(b, r)) for n, a, b, r in zip(names, ours, torch_low, ref)}
    out["adapter"] = (max(rel(a, r) for a, r in zip(adapter, ref)), max(v[1] for v in out.values()))
    return out


def bench_shape(shape, dtype=torch.bfloat16, reps: int = 100, warmup: int = 25, math_limit_gib: float = 40.0) -> Row:
    """Time every operation of one (B, H, N, d, causal) shape."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fewstep.kernels.attention import explicit
    from fewstep.kernels.jvp_attention import flash_attention, jvp_attention
    from fewstep.kernels.jvp_launch import attention_backward, attention_forward

    B, H, N, d, causal = shape
    row = Row(shape, 4 * B * H * N * N * d / (2 if causal else 1))
    ms = lambda x: _median_ms(x, reps, warmup)  # noqa: E731
    mk = lambda: torch.randn(B, H, N, d, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v, tq, tk, tv, go, gt = (mk() for _ in range(8))
    scale = 1 / math.sqrt(d)
    prims = [x.clone().requires_grad_() for x in (q, k, v)]
    tans = [x.clone().requires_grad_() for x in (tq, tk, tv)]

    o, to, lse, mu = attention_forward(q, k, v, tq, tk, tv, scale=scale, causal=causal)
    row.ms["fwd"] = ms(lambda: attention_forward(q, k, v, tq, tk, tv, scale=scale, causal=causal))
    row.ms["bwd"] = ms(lambda: attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, go, gt, scale=scale, causal=causal))
    row.ms["bwd_gT"] = ms(lambda: attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, None, gt, scale=scale, causal=causal))
    row.ms["bwd_gO"] = ms(lambda: attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, go, None, scale=scale, causal=causal))

    def step():
        o, to = jvp_attention(*prims, *tans, causal=causal)
        torch.autograd.backward((o, to), (go, gt))

    def adapter_step():
        o, to = torch.func.jvp(lambda a, b, c: flash_attention(a, b, c, causal=causal), tuple(prims), tuple(tans))
        torch.autograd.backward((o, to), (go, gt))

    def flash_step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(*prims, is_causal=causal)
        o.backward(go)

    def math_step():
        def attn(a, b, c):
            if causal:
                mask = torch.ones(N, N, dtype=torch.bool, device="cuda").tril()
                s = (a.float() @ b.float().transpose(-1, -2)) * scale
                return (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ c.float()).to(dtype)
            return explicit(a, b, c)
        o, to = torch.func.jvp(attn, tuple(prims), tuple(tans))
        torch.autograd.backward((o, to), (go, gt))

    runs = {"step": step, "adapter": adapter_step, "flash": flash_step}
    if 6 * B * H * N * N * 4 / 2**30 <= math_limit_gib:   # ~six fp32 N×N buffers live in the math JVP
        runs["math"] = math_step
    for name, fn in runs.items():
        row.ms[name] = ms(fn)
        row.peak_gib[name] = _peak_gib(fn)
        if N <= 1024:
            row.wall_ms[name] = _wall_ms(fn)
    row.errors = _errors(shape, dtype)
    return row


def kernel_resources() -> dict:
    """Registers, spills and chosen tiles of the latest launch of each kernel."""
    from fewstep.kernels.jvp_launch import COMPILED

    out = {}
    for name, (compiled, config) in COMPILED.items():
        try:
            compiled._init_handles()
        except Exception:  # noqa: BLE001 (older/newer Triton: the attributes may already be set)
            pass
        out[name] = dict(regs=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                         config=str(config) if config is not None else "")
    return out


def summary_lines(rows: list[Row]) -> list[str]:
    """Plain-text table (one line per shape) for logs and the closing note."""
    lines = []
    for r in rows:
        B, H, N, d, causal = r.shape
        flash = r.ms["flash"]
        cells = [f"B{B} H{H} N{N} d{d}{' causal' if causal else ''}",
                 f"fwd {r.ms['fwd']:.3f} ms ({r.tflops('fwd', 3):.0f} TF/s)",
                 f"bwd {r.ms['bwd']:.3f} ms ({r.tflops('bwd', 7.5):.0f})",
                 f"bwd gT {r.ms['bwd_gT']:.3f} ({r.tflops('bwd_gT', 6.5):.0f})",
                 f"bwd gO {r.ms['bwd_gO']:.3f} ({r.tflops('bwd_gO', 2.5):.0f})",
                 f"step {r.ms['step']:.3f} ms ({r.tflops('step', 10.5):.0f}) = {r.ms['step'] / flash:.2f}× flash",
                 f"adapter {r.ms['adapter']:.3f} ms = {r.ms['adapter'] / flash:.2f}× flash",
                 f"flash f+b {flash:.3f} ms ({r.tflops('flash', 3.5):.0f})"]
        if "math" in r.ms:
            cells.append(f"math JVP {r.ms['math']:.2f} ms = {r.ms['math'] / r.ms['step']:.1f}× ours, "
                         f"{r.peak_gib['math']:.2f} GiB vs {r.peak_gib['step']:.3f}")
        else:
            cells.append(f"math JVP skipped (N² memory); ours {r.peak_gib['step']:.3f} GiB")
        if r.wall_ms:
            cells.append(f"wall/GPU step {r.wall_ms['step'] / r.ms['step']:.2f}, adapter {r.wall_ms['adapter'] / r.ms['adapter']:.2f}")
        if r.errors:
            worst = max(v[0] for n, v in r.errors.items() if n != "adapter")
            worst_torch = max(v[1] for v in r.errors.values())
            cells.append(f"rel err O {r.errors['O'][0]:.1e} tO {r.errors['tO'][0]:.1e} all ≤{worst:.1e}, "
                         f"func.jvp path ≤{r.errors['adapter'][0]:.1e} (PyTorch same dtype ≤{worst_torch:.1e})")
        lines.append(" | ".join(cells))
    return lines

