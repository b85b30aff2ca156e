"""Worker of tests/test_distributed.py, and its single-process reference.

Launched as ``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT DATA JOBS`` (gloo, CPU).
``JOBS`` is a JSON list of ``{"name", "objective", "mode", "steps", "run"?, "sets"?, "fast_clock_rank"?}``: each job trains the
tiny config :func:`tiny_config` (with the ``--set``-style overrides ``sets``) through the real :func:`fewstep.train.train` in ``OUT/<run or name>/run``
(``run`` names an earlier job's directory to resume it). Per job and rank ``r`` it writes, outside the
run directory:

* ``OUT/<name>/rank<r>.safetensors``: the rank's final objective state (online net, EMA track, teacher),
  unsharded (under FSDP2 each tensor is gathered on every rank);
* ``OUT/<name>/rank<r>.json``: the result (step, kimg) and every write this rank made inside the run
  directory (``open`` for writing, ``mkdir``, ``rename``/``replace``, ``remove``, ``rmtree``, from a
  ``sys.addaudithook``; safetensors writes from Rust are covered by the directory they need).

:func:`reference` is the 1-process run the distributed runs must equal (see its docstring).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

BATCH = 8   # global images per step; 4 per rank on 2 ranks


def tiny_config(data: str, objective: str, steps: int, mode: str = "ddp", sets: dict | None = None):
    """The smoke recipe on a 2-block, width-32, patch-4 DiT, ``steps`` steps of 8 images, no interval
    checkpoints (a final one is always written), a 2-image grid at 1 NFE, an EMA track of 0.9; ``sets``
    overrides more fields (``{"train.batch_per_gpu": 2}``)."""
    from fewstep.config import apply_overrides
    from fewstep.registry import recipes

    sets = {"data.root": repr(data), "train.batch": BATCH, "train.total_kimg": steps * BATCH / 1000,
            "train.status_kimg": BATCH / 1000, "train.checkpoint_kimg": 0, "train.ema_betas": "{'ema':0.9}",
            "train.distributed": repr(mode), "sample.num_images": 2, "sample.nfe": "(1,)",
            "backbone.depth": 2, "backbone.hidden_size": 32, "backbone.num_heads": 2, "backbone.patch_size": 4, **(sets or {})}
    return apply_overrides(recipes.get("smoke")(objective), [f"{k}={v}" for k, v in sets.items()])


def reference(cfg, world: int = 2, steps: int | None = None) -> dict[str, torch.Tensor]:
    """The objective state after ``steps`` steps of one process that sees what ``world`` ranks see.

    An objective draws its noise, times and label dropout from the ``generator`` it is given, in a fixed
    order over the batch, so one forward on the concatenated global batch with one generator would draw
    *other* noise than the ranks do. The exact single-process equivalent of DDP is: for each rank r, the
    objective on rank r's share of the batch (``BatchStream(rank=r, world_size=world)``) with rank r's
    generator (seed·1000 + r), its own backward; the gradient is the average over ranks (DDP divides each
    rank's gradient by the world size and all-reduces the sum); one AdamW step, then ``after_step`` (EMA
    tracks and teacher). Weights start from rank 0's initialisation (seed·1000), which DDP broadcasts.
    With gradient accumulation each rank sums the gradients of its micro-batches (loss / rounds) first;
    ``train.grad_clip`` clips the averaged gradient, as the trainer does.
    This is DDP's arithmetic in DDP's order, so DDP matches it bit for bit on CPU; FSDP2's
    reduce-scatter sums in another order (about 1e-9 after 3 steps).
    """
    from fewstep.backbones.inputs import trusted_labels
    from fewstep.build import build_objective, resolve
    from fewstep.data import BatchStream, load_dataset

    cfg, t = resolve(cfg), cfg.train
    steps = steps if steps is not None else round(t.total_kimg * 1000 / t.batch)
    dataset = load_dataset(cfg.data)
    torch.manual_seed(t.seed * 1000)
    objective = build_objective(cfg, dataset.spec)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    per_gpu = t.batch_per_gpu or t.batch // world
    rounds = t.batch // (world * per_gpu)
    streams = [iter(BatchStream(dataset, per_gpu, seed=t.seed, rank=r, world_size=world)) for r in range(world)]
    generators = [torch.Generator().manual_seed(t.seed * 1000 + r) for r in range(world)]
    objective.train()
    for step in range(steps):
        grads = []
        for r in range(world):
            local = None
            for _ in range(rounds):
                x, y = next(streams[r])
                with trusted_labels():
                    out = objective(x, y if dataset.spec.num_classes else None, generators[r], step * t.batch)
                g = torch.autograd.grad(out.loss / rounds, params)
                local = g if local is None else [a + b for a, b in zip(local, g)]
            grads.append(local)
        for i, p in enumerate(params):
            total = grads[0][i] / world
            for g in grads[1:]:
                total = total + g[i] / world
            p.grad = total
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip is not None else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step()
    return {k: v.detach().clone() for k, v in objective.state_dict().items()}


class WriteAudit:
    """Paths this process writes under ``root`` while :attr:`root` is set (``sys.addaudithook``)."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        self.root: str | None = None
        self.writes: list[list[str]] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if self.root is None or event not in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
                                              "shutil.rmtree"):
            return
        path = args[0] if event != "os.rename" else args[1]
        if isinstance(path, int) or path is None:
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & self.WRITE_FLAGS)
            if not writing:
                return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(self.root):
            self.writes.append([event, os.path.relpath(path, self.root)])


class FastClock:
    """A stand-in for the trainer's ``time`` module whose ``time()`` runs 10 000× faster than the real one."""

    def __init__(self, speed: float = 1e4) -> None:
        import time

        self.start, self.speed, self._time = time.time(), speed, time

    def time(self) -> float:
        return self.start + (self._time.time() - self.start) * self.speed


def main(out: str, data: str, jobs: list[dict]) -> None:
    import fewstep.train.clock as clock
    import fewstep.train.loop as loop
    from fewstep.train import train
    from fewstep.train.distributed import full

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    built: list[torch.nn.Module] = []
    real_build = loop.build_objective
    loop.build_objective = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    audit = WriteAudit()
    real_time = clock.time
    for job in jobs:
        built.clear()
        run = Path(out) / job.get("run", job["name"]) / "run"
        cfg = tiny_config(data, job["objective"], job["steps"], job["mode"], job.get("sets"))
        audit.root, audit.writes = str(run.resolve()), []
        # ``fast_clock_rank``: that rank's trainer clock runs 10 000× fast (its time budget runs out first)
        clock.time = FastClock() if job.get("fast_clock_rank") == rank else real_time
        result = train(cfg, run, show_progress=False)
        clock.time = real_time
        audit.root = None
        objective = built[0]   # the trained one; later builds are rank 0's plain copies for sampling (FSDP2)
        state = {k: full(v).detach().contiguous().clone() for k, v in objective.state_dict().items()}
        where = Path(out) / job["name"]
        where.mkdir(parents=True, exist_ok=True)
        save_file(state, str(where / f"rank{rank}.safetensors"))
        (where / f"rank{rank}.json").write_text(json.dumps(
            {"step": result.step, "kimg": result.kimg, "writes": audit.writes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    from fewstep.train.distributed import exit_process

    exit_process(0)   # as fewstep's CLI ends its ranks: no interpreter finalisation (gloo could abort there)
