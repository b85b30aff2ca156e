"""CPU cost of one training step of each objective on a CPU recipe, relative to flow matching.

    python scripts/cpu-recipe-cost.py toy2d      # or smoke

CPU time per step on one thread (``time.process_time``, so a machine shared with other work still gives
the ratios), after 5 warm-up steps; the recipe's own batch and backbone. docs/speed.md lists the results.
"""
from __future__ import annotations

import sys
import time

import torch

from fewstep.build import build_objective, build_optimizer, resolve
from fewstep.build import build_config
from fewstep.data import load_dataset


def main(recipe: str = "toy2d", steps: int = 30) -> None:
    torch.set_num_threads(1)
    base = None
    for name in ("fm", "meanflow", "tvm", "scm", "ect"):
        cfg = resolve(build_config(recipe, name, None, None, None, None, []))
        data = load_dataset(cfg.data)
        torch.manual_seed(0)
        objective = build_objective(cfg, data.spec)
        optimizer = build_optimizer([p for p in objective.parameters() if p.requires_grad], cfg, False)
        items = [data[i] for i in range(cfg.train.batch)]
        x, y = torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])
        y = y if data.spec.num_classes else None
        gen = torch.Generator().manual_seed(0)

        def step() -> None:
            out = objective(x, y, gen, 10 ** 6)   # past every warm-up
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            objective.after_step()

        for _ in range(5):
            step()
        start = time.process_time()
        for _ in range(steps):
            step()
        seconds = (time.process_time() - start) / steps
        base = base or seconds
        print(f"{recipe} {name:9s} {1000 * seconds:8.1f} ms CPU/step  {cfg.train.batch / seconds:8.0f} img/s on one "
              f"thread  {seconds / base:4.2f}x fm", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])
