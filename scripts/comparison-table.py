#!/usr/bin/env python3
"""Build and run the objective comparison tables of docs/results/ (issue 21): every registered objective
plus the released-code variants of TVM and MeanFlow, 3 training seeds, equal images, learning curves.

    python scripts/comparison-table.py gpu --out sweeps/fmnist-table            # one GPU (H100/H200)
    python scripts/comparison-table.py cpu-toy --out sweeps/cpu-toy            # 2 CPU cores
    python scripts/comparison-table.py cpu-fmnist --out sweeps/cpu-fmnist      # 2 CPU cores

Each preset writes its sweep file to ``<out>.json`` and runs ``fewstep sweep --file <out>.json --out <out>``
(printed first). A stopped run (SIGTERM, e.g. ``timeout -s TERM 540 python scripts/comparison-table.py …``)
resumes where it stopped when the same command is run again, so a table can be built over several device
calls; rerunning with a larger ``--kimg`` trains every unit on and continues the learning curves. Options
after the preset (``--kimg``, ``--seeds``, ``--parallel``, ``--metric``, ``--num``, ``--eval-every-kimg``,
``--dry-run``) override it.

Members: every objective in ``fewstep list objectives`` (the frontier objectives too, once registered),
plus (where the recipe's backbone has the switch: not on the toy MLP) ``tvm-released`` (``backbone.init=spectral-released``: the released TVM code's effective init) and
``meanflow-released`` (``objective.label_dropout_samples=first``: the released MeanFlow code's label
dropout). Schedules in images: the GPU and toy recipes scale them already (``fashion-mnist-sweep`` to
300 kimg, ``toy2d`` to 1 000 kimg, so a lengthened table stays valid); the ``smoke`` recipe keeps the papers'
values, so ``cpu-fmnist`` scales them to its 12 kimg (ECT's gap halving every 1/8, sCM's tangent warm-up over
the first 10 %, α-Flow's α: 1 → 0 over all of it), fixed in the sweep file so that a rerun with a larger --kimg
is the same sweep. (The table of docs/results/cpu-seeds-2026-12-06/ was made before α-Flow was scaled; its
α-Flow with the scaled curriculum is the separate ``alphaflow-12`` table there.)
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

# Objectives that fine-tune another member's finished run of the same seed (train.init_from).
INIT_FROM = {"dmf": "fm"}

# Released-code variants: (member name, base objective, overrides). See docs/design/tvm-init.md and
# docs/design/meanflow-dropout.md.
VARIANTS = [("tvm-released", "tvm", ["backbone.time_init=normal", "backbone.init=spectral-released"]),
            ("meanflow-released", "meanflow", ["objective.label_dropout_samples=first"])]

# The GPU budget, and why: 11 members × 3 seeds = 33 units of DiT-S/2 at batch 256 (79 optimizer steps per
# 20 kimg). Measured on an H100 on 2026-12-06 at 20 kimg with four units side by side and train.compile=true:
# training img/s per unit fm 1 670, ECT 1 330, Shortcut 1 180, α-Flow 1 000, iMF 630, sCM 580, MeanFlow 530,
# TVM 480, meanflow-released 410, tvm-released 360, DMF 350; the whole table took ≈ 16 minutes, of which
# ≈ 5 were training and the rest compilation (every segment) and the evaluations (≈ 22 s per point: 5 000
# samples at NFE 1, 2 and 4). 20 kimg is far too short: every flow member was still at its initial
# (noise) output, FD ≈ 666 for all of them. At 60 kimg (235 steps) training takes ≈ 16 minutes, so the
# table needs ≈ 28 minutes: one session's device time with nothing else run. A longer budget is a rerun
# with a larger --kimg (the units train on; the curves continue).
PRESETS = {
    "gpu": dict(recipe="fashion-mnist-sweep", kimg=60.0, eval_every_kimg=20.0, seeds=[0, 1, 2], nfe=[1, 2, 4],
                metrics=["fmnist-classifier"], num=5000, grid=64, parallel=4,
                overrides=["train.compile=true"], schedule_kimg=None),
    # 2-D toy: every member close to its limit in minutes on 2 cores.
    "cpu-toy": dict(recipe="toy2d", kimg=300.0, eval_every_kimg=100.0, seeds=[0, 1, 2], nfe=[1, 2, 4],
                    metrics=["sliced-wasserstein"], num=2000, grid=64, parallel=1,
                    overrides=["sample.num_images=1000", "train.status_kimg=25"], schedule_kimg=None),
    # Fashion-MNIST with the smoke-size DiT (4 blocks, width 128, patch 4, fp32, EMA 0.995).
    "cpu-fmnist": dict(recipe="smoke", kimg=12.0, eval_every_kimg=4.0, seeds=[0, 1, 2], nfe=[1, 2, 4],
                       metrics=["fmnist-classifier"], num=2000, grid=16, parallel=1,
                       overrides=["train.status_kimg=1", "train.checkpoint_kimg=0", "sample.num_images=16"],
                       schedule_kimg=12.0),
}


def members(recipe: str, schedule_kimg: float | None) -> list[dict]:
    """Every registered objective, then the released variants the recipe's backbone has the switches for
    (``tvm-released`` needs the DiT: the toy MLP has no patch embedding); schedules in images scaled to
    ``schedule_kimg`` (``None``: the recipe's)."""
    import dataclasses

    from fewstep.build import build_config
    from fewstep.config import ConfigError, default_objective_config
    from fewstep.registry import objectives

    names = list(objectives.names())
    # An objective that converts another's finished run starts from that member (DMF from flow matching), so
    # it comes after it.
    out = [{"objective": n, **({"init_from": INIT_FROM[n]} if n in INIT_FROM else {})} for n in names
           if n not in INIT_FROM or INIT_FROM[n] in names]
    out.sort(key=lambda m: "init_from" in m)
    for name, base, sets in VARIANTS:
        if base not in names:
            continue
        try:
            build_config(recipe, base, None, None, None, None, list(sets))
        except ConfigError as exc:
            print(f"{name} left out: {exc}")
            continue
        out.append({"name": name, "objective": base, "overrides": list(sets)})
    for m in out if schedule_kimg else []:
        kimg = schedule_kimg
        fields = {f.name for f in dataclasses.fields(default_objective_config(m["objective"]))}
        scaled = [f"objective.stage_kimg={kimg / 8:g}"] if "stage_kimg" in fields else []
        scaled += [f"objective.warmup_kimg={kimg / 10:g}"] if "warmup_kimg" in fields else []
        scaled += (["objective.alpha_start_kimg=0", f"objective.alpha_end_kimg={kimg:g}"]
                   if "alpha_end_kimg" in fields else [])
        if scaled:
            m["overrides"] = m.get("overrides", []) + scaled
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("--out", type=Path, required=True, help="sweep directory (the sweep file goes to OUT.json)")
    ap.add_argument("--kimg", type=float)
    ap.add_argument("--seeds", type=str, help="e.g. 0,1,2")
    ap.add_argument("--parallel", type=int)
    ap.add_argument("--metric", type=str, help="comma list, e.g. fmnist-classifier,inception")
    ap.add_argument("--num", type=int)
    ap.add_argument("--eval-every-kimg", type=float)
    ap.add_argument("--dry-run", action="store_true", help="write the sweep file, check every member, print, stop")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for key in ("kimg", "parallel", "num", "eval_every_kimg"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.seeds:
        p["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.metric:
        p["metrics"] = args.metric.split(",")
    parallel, schedule_kimg = p.pop("parallel"), p.pop("schedule_kimg")
    spec = {**p, "members": members(p["recipe"], schedule_kimg)}
    file = args.out.with_suffix(".json")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(spec, indent=1) + "\n")
    cmd = [sys.executable, "-m", "fewstep.cli", "sweep", "--file", str(file), "--out", str(args.out),
           "--parallel", str(parallel)] + (["--dry-run"] if args.dry_run else [])
    print("sweep file:", file)
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
