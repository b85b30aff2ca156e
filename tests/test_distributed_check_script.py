"""scripts/distributed-check.sh on 2 CPU ranks (gloo): three short smoke-recipe runs, each distributed one
compared with the plain one. Slow (about 45 s): `pytest -m slow tests/test_distributed_check_script.py`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "distributed-check.sh"


@pytest.mark.slow
def test_the_script_trains_three_ways_and_compares(tmp_path, fashion_dir):
    env = {**os.environ, "FEWSTEP_DATA": str(fashion_dir), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "NPROC": "2", "RECIPE": "smoke", "KIMG": "0.256", "EXTRA": "",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for mode in ("ddp", "fsdp2"):
        assert (tmp_path / mode / "checkpoint-00000004").is_dir() and (tmp_path / f"{mode}.png").is_file()
    assert proc.stdout.count("settings that change the experiment: none") == 2
    assert proc.stdout.count("loss at 4 matched points") == 2
