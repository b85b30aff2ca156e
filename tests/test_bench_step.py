"""``fewstep bench step`` pieces that run without a GPU: the summary and kernel lines, and the CLI's
refusal on a machine without CUDA."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fewstep.bench.step import KernelTime, StepResult, kernel_table, summary
from fewstep.cli import app


def result(objective, s_per_step, top=(), times=()):
    return StepResult(objective=objective, batch=32, compiled=True, checkpointing=False, s_per_step=s_per_step,
                      images_per_s=32 / s_per_step, peak_gib=45.0, kernels_per_step=6740, flops_per_step=1e15,
                      mfu=0.25, top_kernels=list(top), times=list(times))


def test_summary_gives_the_ratio_against_the_baseline():
    tvm, fm = result("tvm", 0.3, times=[0.31, 0.3, 0.27]), result("fm", 0.1, times=[0.1, 0.09, 0.12])
    lines = summary([tvm, fm], fm)
    assert lines[0].endswith("6740 kernels, 3.00× fm (best to best 3.00×)") and "compiled" in lines[0]
    assert "0.3000 s/step (best 0.2700)" in lines[0] and "0.1000 s/step (best 0.0900)" in lines[1]
    assert "×" not in lines[1]


def test_kernel_table_states_time_share_and_launches():
    long_name = "triton_" + "x" * 120
    r = result("tvm", 0.2, [KernelTime("sm90_gemm", 448, 50.0), KernelTime(long_name, 28, 2.5)])
    head, gemm, fused = kernel_table(r)
    assert head == "top kernels of one tvm step (200.0 ms):"
    r.kernel_ms = 150.0                           # every kernel of the profiled step, not only the top ones
    assert kernel_table(r)[0] == "top kernels of one tvm step (200.0 ms; all kernels 150.0 ms):"
    assert r.gpu_busy == pytest.approx(0.75) and "6740 kernels (GPU busy 75%)" in summary([r], None)[0]
    r.host_ms = 180.4
    assert "6740 kernels (GPU busy 75%), host 180 ms/step" in summary([r], None)[0]
    assert gemm.split() == ["50.00", "ms", "25.0%", "448×", "sm90_gemm"]
    assert fused.split()[2] == "1.2%" and fused.endswith("...") and len(fused.split()[-1]) == 90


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bench_step_without_a_gpu_says_so():
    out = CliRunner().invoke(app, ["bench", "step", "--profile", "5"])
    assert out.exit_code != 0 and "needs a CUDA GPU" in out.output


@pytest.mark.parametrize("objective", ["tvm", "fm"])
def test_bench_objective_runs_full_steps_and_counts_the_objectives_flops(objective):
    """The 1-GPU benchmark's wiring (build, optimizer, timed steps, FLOPs), on a tiny DiT on the CPU."""
    from fewstep.bench.step import bench_objective
    from fewstep.build import resolve
    from fewstep.config import apply_overrides
    from fewstep.contracts import DataSpec
    from fewstep.registry import recipes

    sets = ["backbone.depth=2", "backbone.hidden_size=32", "backbone.num_heads=2", "backbone.patch_size=4"]
    cfg = resolve(apply_overrides(recipes.get("smoke")(objective), sets))
    spec = DataSpec(name="synthetic", channels=1, resolution=16, num_classes=10, num_items=4)
    from logcapture import captured

    with captured() as logs:
        r = bench_objective(cfg, spec, batch=4, steps=2, warmup=1, compile=False, device=torch.device("cpu"))
    assert (r.objective, r.batch, len(r.times)) == (objective, 4, 2) and r.s_per_step > 0
    assert r.kernels_per_step is None and r.mfu is None and r.top_kernels == [] and r.gpu_busy is None and r.host_ms is None   # CPU: no profile
    assert logs[0].startswith(f"{objective}: built in") and logs[1].startswith(f"{objective}: warm-up step 1/1")
    per_forward = 11 if objective == "tvm" else 3                  # TVM: JVP 2F + its backward 4F + teacher 2F + FM 3F
    from fewstep.build import build_objective

    with torch.device("cpu"):
        F = build_objective(cfg, spec).backbone.forward_flops(1)
    assert r.flops_per_step == pytest.approx(per_forward * F * 4)


def test_host_time_counts_issuing_the_step_and_not_the_final_wait():
    import time

    from fewstep.bench.step import host_time_ms

    events = []

    def step():
        events.append("step")
        time.sleep(0.02)

    def sync():
        events.append("sync")
        time.sleep(0.05)          # waiting for the device is not host time

    ms = host_time_ms(step, repeats=3, sync=sync)
    assert 19 < ms < 45, ms
    assert events == ["sync", "step"] * 3 + ["sync"]   # each step starts from an idle device


def test_bench_json_names_the_gpu_and_versions_first(tmp_path, monkeypatch):
    import json

    from fewstep.bench.cli import write_bench_json

    triton = pytest.importorskip("triton")                       # a dev dependency on Linux x86-64

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    path = tmp_path / "new" / "bench.json"                      # parents are created
    write_bench_json(path, {"batch": 32, "when": object()}, default=lambda v: "object")
    body = json.loads(path.read_text())
    assert list(body) == ["device", "torch", "triton", "batch", "when"]
    assert (body["device"], body["torch"], body["triton"], body["when"]) == \
        ("Fake GPU", torch.__version__, triton.__version__, "object")
    write_bench_json(None, {"batch": 32})                       # no --out: nothing written, no GPU asked
