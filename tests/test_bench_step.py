"""``fewstep bench step`` pieces that run without a GPU: the summary and kernel lines, and the CLI's
refusal on a machine without CUDA."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from fewstep.bench.step import KernelTime, StepResult, kernel_table, summary
from fewstep.cli import app


def result(objective, s_per_step, top=()):
    return StepResult(objective=objective, batch=32, compiled=True, checkpointing=False, s_per_step=s_per_step,
                      images_per_s=32 / s_per_step, peak_gib=45.0, kernels_per_step=6740, flops_per_step=1e15,
                      mfu=0.25, top_kernels=list(top))


def test_summary_gives_the_ratio_against_the_baseline():
    tvm, fm = result("tvm", 0.3), result("fm", 0.1)
    lines = summary([tvm, fm], fm)
    assert lines[0].endswith("6740 kernels, 3.00× fm") and "0.3000 s/step" in lines[0] and "compiled" in lines[0]
    assert "×" not in lines[1]


def test_kernel_table_states_time_share_and_launches():
    long_name = "triton_" + "x" * 120
    r = result("tvm", 0.2, [KernelTime("sm90_gemm", 448, 50.0), KernelTime(long_name, 28, 2.5)])
    head, gemm, fused = kernel_table(r)
    assert head == "top kernels of one tvm step (200.0 ms):"
    assert gemm.split() == ["50.00", "ms", "25.0%", "448×", "sm90_gemm"]
    assert fused.split()[2] == "1.2%" and fused.endswith("...") and len(fused.split()[-1]) == 90


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bench_step_without_a_gpu_says_so():
    out = CliRunner().invoke(app, ["bench", "step", "--profile", "5"])
    assert out.exit_code != 0 and "needs a CUDA GPU" in out.output
