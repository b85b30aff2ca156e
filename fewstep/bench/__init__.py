"""Benchmarks behind ``fewstep bench``: GPU timings reported as ratios against a baseline measured in
the same process (one module per benchmark)."""
from __future__ import annotations

from typing import Callable


def cuda_times(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, timed with CUDA events (one sync per call)."""
    import torch

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times
