"""Worker of tests/test_bench_scaling.py: ``torchrun --nproc_per_node 2 tests/bench_scaling_worker.py OUT
MODE OBJECTIVE`` runs :func:`fewstep.bench.scaling.bench_scaling` on a 2-block DiT on the CPU (gloo)
with ``train.distributed=MODE``. Every rank writes ``OUT/rank<r>.safetensors`` (its full objective state
after the wrapped steps, gathered under FSDP2); rank 0 writes ``OUT/result.json`` (the ScalingResult with
its efficiency) and ``OUT/log.txt`` (what it logged)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(out: str, mode: str, objective: str) -> None:
    from fewstep.bench.scaling import bench_scaling, scaling_line
    from fewstep.build import resolve
    from fewstep.config import apply_overrides
    from fewstep.contracts import DataSpec
    from fewstep.registry import recipes
    from fewstep.train.distributed import Parallel, full

    torch.set_num_threads(1)
    rank, out_dir = int(os.environ["RANK"]), Path(out)
    sets = {"backbone.depth": 2, "backbone.hidden_size": 32, "backbone.num_heads": 2, "backbone.patch_size": 4,
            "train.distributed": repr(mode)}
    cfg = resolve(apply_overrides(recipes.get("smoke")(objective), [f"{k}={v}" for k, v in sets.items()]))
    spec = DataSpec(name="synthetic", channels=1, resolution=16, num_classes=10, num_items=4)
    lines: list[str] = []

    def keep(model: torch.nn.Module, name: str = "") -> None:
        state = {k: full(v).detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out_dir / f"rank{rank}{name}.safetensors"))

    prepare = Parallel.prepare

    def prepare_and_keep(self, objective, optimizer):   # the state the wrapped steps start from
        keep(objective, "-start")
        return prepare(self, objective, optimizer)

    Parallel.prepare = prepare_and_keep

    from logcapture import captured

    with captured() as logged:
        result = bench_scaling(cfg, spec, batch=4, steps=2, warmup=1, compile=False, after=keep)
    lines += logged if rank == 0 else []
    if rank == 0:
        lines.append(scaling_line(result))
        (out_dir / "log.txt").write_text("\n".join(lines))
        (out_dir / "result.json").write_text(json.dumps({**dataclasses.asdict(result),
                                                         "efficiency": result.efficiency}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    from fewstep.train.distributed import exit_process

    exit_process(0)   # as fewstep's CLI ends its ranks: no interpreter finalisation (gloo could abort there)
