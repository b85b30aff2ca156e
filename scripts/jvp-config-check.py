"""Check one tile configuration of one JVP-attention kernel on the GPU (others at their first):
``python scripts/jvp-config-check.py B H N d KERNEL BLOCK_A BLOCK_B WARPS STAGES``, KERNEL in
fwd / kv / q. Prints ok with the O and gradient errors against fp32 math and the median ms of the
fused forward and of the backward, or dies (a faulting configuration kills its process)."""
import math
import sys

import torch
import triton
import triton.testing

from fewstep.kernels import jvp_launch as L

B, H, N, d = (int(x) for x in sys.argv[1:5])
kernel = sys.argv[5]
a, b, w, s = (int(x) for x in sys.argv[6:10])
tuner, names = {"fwd": (L._FWD, ("BLOCK_M", "BLOCK_N")), "kv": (L._BWD_KV, ("BLOCK_N", "BLOCK_M")),
                "q": (L._BWD_Q, ("BLOCK_M", "BLOCK_N"))}[kernel]
tuner.configs = [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)]
for other in (L._FWD, L._BWD_KV, L._BWD_Q):
    other.configs = other.configs[:1]
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v, tq, tk, tv, go, gt = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(8))
scale = 1 / math.sqrt(d)
o, to, lse, mu = L.attention_forward(q, k, v, tq, tk, tv, scale=scale)
grads = L.attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, go, gt, scale=scale)
torch.cuda.synchronize()
P = [x.float().requires_grad_() for x in (q, k, v)]
T = [x.float().requires_grad_() for x in (tq, tk, tv)]
with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
    ro, rto = torch.func.jvp(torch.nn.functional.scaled_dot_product_attention, tuple(P), tuple(T))
ref = torch.autograd.grad((ro * go.float()).sum() + (rto * gt.float()).sum(), P + T)
rel = lambda x, r: ((x.float() - r).abs().max() / r.abs().max()).item()  # noqa: E731
errs = [rel(o, ro), rel(to, rto)] + [rel(x, r) for x, r in zip(grads, ref)]
fwd = triton.testing.do_bench(lambda: L.attention_forward(q, k, v, tq, tk, tv, scale=scale), rep=50)
bwd = triton.testing.do_bench(lambda: L.attention_backward(q, k, v, tq, tk, tv, o, to, lse, mu, go, gt, scale=scale), rep=50)
compiled = {n: c for n, (c, _) in L.COMPILED.items()}
key = {"fwd": "fwd-fused", "kv": "bwd-kv-both", "q": "bwd-q-both"}[kernel]
c = compiled[key]
print(f"{kernel} {a}x{b} w{w} s{s}: ok errs max {max(errs):.1e} (O {errs[0]:.1e} tO {errs[1]:.1e}) "
      f"fwd {fwd:.3f} ms bwd {bwd:.3f} ms regs {c.n_regs} spills {c.n_spills}", flush=True)
