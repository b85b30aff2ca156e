"""GPU check: the DiT's explicit JVP (eager and compiled) against torch.func.jvp, on a TVM loss.

Usage: python scripts/check-jvp-paths.py [--backbone dit-b] [--batch 8]
Prints, per path, the relative max error of the loss, F, ∂_sF and every parameter gradient against the
torch.func.jvp path in fp32 (TF32 off); exits 1 when any exceeds 1e-3.
"""
import argparse
import sys

import torch

from fewstep.backbones.inputs import trusted_labels
from fewstep.build import build_objective, resolve
from fewstep.build import build_config
from fewstep.compiling import compile_objective
from fewstep.contracts import DataSpec
from fewstep.objectives.jvp import backbone_jvp, functorch_jvp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dit-b")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = resolve(build_config("imagenet-256-tvm-w2", "tvm", args.backbone, None, None, None, []))
    spec = DataSpec(name="synthetic", channels=4, resolution=32, num_classes=1000, num_items=1, kind="latents")
    torch.manual_seed(0)
    obj = build_objective(cfg, spec).cuda()
    for p in obj.backbone.parameters():      # leave adaLN-Zero's zero init so every path is exercised
        p.data.add_(0.02 * torch.randn_like(p))
    B = args.batch
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(B, 4, 32, 32, device="cuda", generator=g)
    y = torch.randint(0, 1000, (B,), device="cuda", generator=g)

    def run(functorch: bool):
        obj.zero_grad(set_to_none=True)
        with functorch_jvp(functorch), trusted_labels():
            t = torch.rand(B, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            s = t * 0.5
            F, dF = backbone_jvp(obj.backbone, x, t, s, (None, None, torch.ones_like(s)), y=y,
                                 guidance=torch.full_like(t, 0.5))
            out = obj(x, y, torch.Generator("cuda").manual_seed(3))
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in obj.named_parameters() if p.grad is not None}
        return out.loss.detach(), F.detach(), dF.detach(), grads

    ref = run(True)
    worst = 0.0
    for label in ("explicit eager", "explicit compiled"):
        if label.endswith("compiled"):
            compile_objective(obj)
        got = run(False)
        errs = {"loss": got[0], "F": got[1], "dF/ds": got[2]}
        rel = {k: ((v - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
               for (k, v), r in zip(errs.items(), ref[:3])}
        grel = {n: ((got[3][n] - ref[3][n]).abs().max() / ref[3][n].abs().max().clamp_min(1e-30)).item()
                for n in ref[3]}
        top = max(grel, key=grel.get)
        print(f"{label}: loss {rel['loss']:.2e}, F {rel['F']:.2e}, dF/ds {rel['dF/ds']:.2e}, "
              f"grads max {grel[top]:.2e} ({top}), {len(grel)} tensors", flush=True)
        worst = max(worst, *rel.values(), grel[top])
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
