"""Two processes on CPU (gloo): DDP and FSDP2 through the real trainer, checked against one process.

Two ``torchrun --nproc_per_node 2`` launches of ``tests/distributed_worker.py`` (one per
``train.distributed`` mode) train a 2-block DiT for a few steps of TVM and MeanFlow through
:func:`fewstep.train.train`: the objective is what DDP wraps (or FSDP2 shards), so the JVP runs inside
the wrapped forward. Each rank reports its final objective state (online net, EMA track, TVM's teacher)
and every write it made in the run directory. Checked here:

* after 3 steps both ranks hold identical weights, EMA and teacher (atol 0), which equal the 1-process
  reference of :func:`distributed_worker.reference` (each rank's half of the batch with that rank's
  generator, gradients averaged: DDP's arithmetic; the concatenated batch under one generator would
  draw other noise) to fp32 tolerance — bit for bit for DDP;
* the same with gradient accumulation (2 micro-batches per rank) and gradient clipping (active: the
  norms are about 1.5, the limit 0.5) and, for FSDP2, activation checkpointing;
* only rank 0 writes in the run directory (config, log, checkpoints, grids); rank 1 writes nothing;
* a 2-rank run resumed from its step-3 checkpoint ends bit-identical to a straight 5-step run on both
  ranks (every rank restores its own RNG stream); FSDP2 resumes its sharded optimizer state;
* FSDP2 checkpoints hold full tensors in the DDP format, which ``load_objective`` reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distributed_worker import reference, tiny_config
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend (CPU collectives)")

DDP_JOBS = [
    {"name": "tvm", "objective": "tvm", "mode": "ddp", "steps": 3},
    {"name": "meanflow", "objective": "meanflow", "mode": "ddp", "steps": 3},
    {"name": "tvm-accum", "objective": "tvm", "mode": "ddp", "steps": 3,
     "sets": {"train.batch_per_gpu": 2, "train.grad_clip": 0.5}},
    {"name": "tvm-resumed", "run": "tvm", "objective": "tvm", "mode": "ddp", "steps": 5},
    {"name": "tvm-5", "objective": "tvm", "mode": "ddp", "steps": 5},
    {"name": "budget", "objective": "fm", "mode": "ddp", "steps": 40, "fast_clock_rank": 1,
     "sets": {"train.max_minutes": 1.0}},
]
FSDP2_JOBS = [
    {"name": "tvm", "objective": "tvm", "mode": "fsdp2", "steps": 3},
    {"name": "meanflow", "objective": "meanflow", "mode": "fsdp2", "steps": 3},
    {"name": "tvm-accum-ac", "objective": "tvm", "mode": "fsdp2", "steps": 3,
     "sets": {"train.batch_per_gpu": 2, "train.grad_clip": 0.5, "train.activation_checkpointing": True}},
    {"name": "tvm-resumed", "run": "tvm", "objective": "tvm", "mode": "fsdp2", "steps": 5},
]


def launch(out: Path, data: Path, jobs: list[dict]) -> Path:
    """Run the worker on 2 gloo ranks on the CPU (torchrun picks a free port; GPUs hidden, as the
    reference runs on the CPU); fail with both ranks' output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(WORKER), str(out), str(data), json.dumps(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}", pytrace=False)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, fashion_dir) -> Path:
    return launch(tmp_path_factory.mktemp("ddp"), fashion_dir, DDP_JOBS)


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory, fashion_dir) -> Path:
    return launch(tmp_path_factory.mktemp("fsdp2"), fashion_dir, FSDP2_JOBS)


def states(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / name / f"rank{r}.safetensors") for r in range(WORLD)]


def report(out: Path, name: str, rank: int) -> dict:
    return json.loads((out / name / f"rank{rank}.json").read_text())


def assert_identical(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def assert_matches_reference(state: dict, ref: dict, init: dict) -> None:
    """``state`` equals the reference to fp32 tolerance, and training moved it well beyond that."""
    assert state.keys() == ref.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref if k.startswith("backbone."))
    assert moved > 1e-3, f"the weights barely moved ({moved:.2g}): the comparison would prove nothing"


def reference_for(data: Path, job: dict, steps: int | None = None) -> tuple[dict, dict]:
    cfg = tiny_config(str(data), job["objective"], job["steps"], job["mode"], job.get("sets"))
    return reference(cfg, WORLD, steps), reference(cfg, WORLD, 0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("index", [0, 1, 2], ids=["tvm", "meanflow", "accumulation"])
def test_ranks_agree_and_equal_one_process(mode, index, request, fashion_dir):
    out = request.getfixturevalue(mode)
    job = (DDP_JOBS if mode == "ddp" else FSDP2_JOBS)[index]
    rank0, rank1 = states(out, job["name"])
    tracks = [k for k in rank0 if k.startswith(("ema.", "teacher."))]
    assert any(k.startswith("ema.ema.") for k in tracks)
    assert any(k.startswith("teacher.") for k in tracks) == (job["objective"] == "tvm")
    assert_identical(rank0, rank1, f"{mode} {job['name']}: rank 0 vs rank 1 (online, EMA, teacher)")
    ref, init = reference_for(fashion_dir, job)
    assert_matches_reference(rank0, ref, init)
    if mode == "ddp":   # DDP performs the reference's arithmetic in the reference's order
        assert_identical(rank0, ref, f"ddp {job['name']} vs the 1-process reference")
    ema_gap = max((rank0[f"ema.ema.{k[9:]}"] - rank0[k]).abs().max().item() for k in rank0 if k.startswith("backbone."))
    assert ema_gap > 1e-4, "the EMA track equals the online net: after_step did not run as an EMA"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_only_rank_0_writes(mode, request):
    out = request.getfixturevalue(mode)
    for job in DDP_JOBS if mode == "ddp" else FSDP2_JOBS:
        assert report(out, job["name"], 1)["writes"] == [], f"rank 1 wrote in the run directory ({job['name']})"
        written = {path for _, path in report(out, job["name"], 0)["writes"]}
        step = f"checkpoint-{report(out, job['name'], 0)['step']:08d}"   # the final one (a budget ends early)
        assert {"config.json", "log.jsonl", "samples/final.png", step} <= written, written   # step: the rename
        files = {p.name for p in (out / job.get("run", job["name"]) / "run" / step).iterdir()}
        assert {"objective.safetensors", "optimizer.safetensors", "rng-rank0.safetensors",
                "rng-rank1.safetensors"} <= files


def test_every_rank_resumes_exactly(ddp):
    resumed, straight = states(ddp, "tvm-resumed"), states(ddp, "tvm-5")
    assert report(ddp, "tvm-resumed", 1)["step"] == 5
    for rank in range(WORLD):
        assert_identical(resumed[rank], straight[rank], f"rank {rank}: 3 steps + resume + 2 vs 5 straight")


def test_fsdp2_resumes_and_writes_full_checkpoints(fsdp2, ddp, fashion_dir):
    from fewstep.build import load_objective

    rank0, rank1 = states(fsdp2, "tvm-resumed")
    assert_identical(rank0, rank1, "fsdp2 resumed: rank 0 vs rank 1")
    ref, init = reference_for(fashion_dir, FSDP2_JOBS[3])
    assert_matches_reference(rank0, ref, init)   # a wrongly restored Adam state would be off by ~1e-4
    full, plain = (load_file(run / "tvm" / "run" / "checkpoint-00000003" / "objective.safetensors")
                   for run in (fsdp2, ddp))
    assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in plain.items()}
    opt_full, opt_plain = (load_file(run / "tvm" / "run" / "checkpoint-00000003" / "optimizer.safetensors")
                           for run in (fsdp2, ddp))
    assert {k: v.shape for k, v in opt_full.items()} == {k: v.shape for k, v in opt_plain.items()}
    objective, _, ckpt = load_objective(fsdp2 / "tvm" / "run")
    assert ckpt.step == 5
    assert_identical({k: v for k, v in objective.state_dict().items()}, rank0, "load_objective vs rank 0's weights")


def test_launchers_fewstep_cannot_honour_are_refused():
    from accelerate.utils import DistributedType

    from fewstep.config import ConfigError, apply_overrides
    from fewstep.train.distributed import check_launch

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ConfigError, match="train.distributed=fsdp2"):
            check_launch(SimpleNamespace(distributed_type=kind), "ddp")
    check_launch(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), "fsdp2")
    with pytest.raises(ConfigError, match="train.distributed must be one of 'ddp', 'fsdp2'"):
        apply_overrides(tiny_config("x", "tvm", 1), ["train.distributed=fsdp"])


def test_a_time_budget_stops_every_rank_at_the_same_step(ddp):
    """Rank 1's trainer clock runs 10 000× fast: its 1-minute budget runs out within the first steps,
    while rank 0's would take a minute. The budget decision is reduced over ranks, so both stop after
    the same step (a rank stopping alone would leave the other waiting in its next all-reduce)."""
    steps = [report(ddp, "budget", r)["step"] for r in range(WORLD)]
    assert steps[0] == steps[1] and 2 <= steps[0] < 40, steps
    assert_identical(*states(ddp, "budget"), "budget: rank 0 vs rank 1")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_log_says_what_each_launch_ran_on(mode, request):
    from fewstep.train.status import start_records

    out = request.getfixturevalue(mode)
    first, resumed = start_records(out / "tvm" / "run")   # the 3-step run, then its resume to 5 steps
    assert {k: first[k] for k in ("processes", "device", "backend", "distributed", "mixed_precision")} == \
        {"processes": 2, "device": "cpu", "backend": "gloo", "distributed": mode, "mixed_precision": "no"}
    assert (first["step"], resumed["step"]) == (0, 3) and first["torch"] == torch.__version__
