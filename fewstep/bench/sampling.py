"""``fewstep bench sample``: few-step sampling throughput against a bare backbone forward, same process.

For each mode — ``eager``; ``compile`` (the backbone's regions compiled, :mod:`fewstep.compiling`);
``graphs`` (compiled regions, then the whole chain captured in one CUDA graph and replayed) — and each
NFE, the sampler core is timed on device-resident noise and labels: the objective's ``step`` chained
over its default schedule under bf16 autocast, exactly the loop of :func:`fewstep.sample.sample`. The
baseline is one bare backbone call at the same batch, in the same mode. 1-NFE sampling should cost one
forward: its throughput ratio to the bare forward is reported. ``sample()`` end to end (per-seed CPU
noise, copy back) is timed too, at 1 NFE in eager mode.
"""
from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.backbones.inputs import trusted_labels
from fewstep.bench import cuda_times
from fewstep.build import build_objective, resolve
from fewstep.config import RunConfig
from fewstep.contracts import Condition, DataSpec

MODES = ("eager", "compile", "graphs")


@dataclass
class SampleRow:
    """Images/s of one (mode, what) pair; ``what`` is ``forward`` or ``nfe=K``."""

    mode: str
    what: str
    ms_per_batch: float
    images_per_s: float


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return statistics.median(cuda_times(fn, reps)) * 1e3


def _graphed(fn):
    """``fn`` (no arguments, fixed shapes) captured in a CUDA graph; returns a replaying callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_sampling(cfg: RunConfig, spec: DataSpec, *, batch: int, nfes: list[int], modes: list[str],
                   reps: int = 20) -> list[SampleRow]:
    """Rows for every mode × (bare forward, each NFE), plus ``sample()`` end to end (eager, 1 NFE)."""
    from fewstep.compiling import compile_objective
    from fewstep.sample import sample

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:             # initialise on the GPU (spectral init's SVDs are slow on a CPU)
        objective = build_objective(resolve(cfg), spec).eval()
    net, needs = objective.backbone, objective.needs
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, spec.channels, spec.resolution, spec.resolution, device=device, generator=g)
    y = torch.randint(0, spec.num_classes, (batch,), device=device, generator=g) if spec.num_classes else None
    cond = Condition(y=y, guidance=None)
    ones = torch.ones(batch, device=device)
    extra = {"guidance": ones * 0.5} if needs.guidance_input else {}

    def forward() -> Tensor:
        s = ones * 0.5 if needs.time_inputs == 2 else None
        return net(x0, ones, s, y=y, **extra)

    def chain(nfe: int):
        schedule = objective.default_schedule(nfe)
        times = [(torch.full((batch,), a, device=device), torch.full((batch,), b, device=device))
                 for a, b in zip(schedule, schedule[1:])]

        def run() -> Tensor:
            x = x0
            for t, s in times:
                x = objective.step(x, t, s, cond, net=net).float()
            return x
        return run

    rows: list[SampleRow] = []
    compiled = False
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16), trusted_labels():
        for mode in modes:
            if mode in ("compile", "graphs") and not compiled:
                compile_objective(objective)
                compiled = True
            fns = {"forward": forward, **{f"nfe={k}": chain(k) for k in nfes}}
            for what, fn in fns.items():
                ms = _median_ms(_graphed(fn) if mode == "graphs" else fn, reps)
                rows.append(SampleRow(mode, what, ms, batch / ms * 1e3))
            if mode == "eager":       # end to end, before any compilation
                seeds = list(range(batch))
                ms = _median_ms(lambda: sample(objective, seeds, 1, batch_size=batch, autocast=True), reps)
                rows.append(SampleRow("eager", "sample() nfe=1", ms, batch / ms * 1e3))
    del objective
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def summary(rows: list[SampleRow]) -> list[str]:
    """Lines per row, with each NFE's throughput as a share of the same mode's bare forward."""
    base = {r.mode: r.images_per_s for r in rows if r.what == "forward"}
    lines = []
    for r in rows:
        share = ""
        if r.what != "forward" and r.mode in base:
            share = f"  ({100 * r.images_per_s / base[r.mode]:.1f}% of the {r.mode} forward)"
        lines.append(f"{r.mode:>8} {r.what:>16}: {r.ms_per_batch:8.2f} ms/batch {r.images_per_s:9.1f} img/s{share}")
    return lines
