"""``fewstep bench step`` under torchrun: the scaling benchmark on 2 CPU ranks (gloo), DDP and FSDP2.

The wrapped steps must be real synchronised training (the ranks end with identical weights, EMA and
teacher, although they drifted apart while timing alone), and the result must state both phases."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("bench_scaling_worker.py")

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend (CPU collectives)")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_scaling_times_alone_then_wrapped_and_the_wrapped_steps_stay_in_sync(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(tmp_path), mode, "tvm"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["objective"], result["mode"], result["world"], result["batch"]) == ("tvm", mode, 2, 4)
    assert result["alone_s"] > 0 and result["wrapped_s"] > 0
    assert result["efficiency"] == pytest.approx(result["alone_s"] / result["wrapped_s"])
    assert math.isnan(result["alone_peak_gib"])                           # no GPU memory to report
    log = (tmp_path / "log.txt").read_text()
    assert "tvm alone: warm-up step 1/1" in log and f"tvm {mode}: warm-up step 1/1" in log
    assert f"tvm {mode} × 2 GPUs, batch 4/GPU" in log and "scaling efficiency" in log

    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a) and any(k.startswith("ema.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"the ranks disagree after the wrapped steps: {differ[:3]}"
    start = load_file(tmp_path / "rank0-start.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a if k.startswith("backbone."))
    assert moved > 1e-4, f"the wrapped steps did not train (max change {moved:.2g})"
