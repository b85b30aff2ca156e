"""``fewstep bench data``: does data loading keep up with the GPU?

For each loader setting (DataLoader workers, prefetch depth, pinned memory) it builds the training
:class:`~fewstep.data.loader.BatchStream` exactly as ``fewstep train`` does and measures:

* **loader throughput**: batches/s and images/s with a no-op consumer (each batch is moved to the device
  and, on CUDA, synchronised before the clock stops). This is the most the data path can deliver.
* **stall under a step** (``step_ms`` > 0): the consumer holds the host for ``step_ms`` per batch, as a
  training step that synchronises once per step does, and the time each ``next()`` then blocks the
  host (the GPU, synchronised, sits idle meanwhile) is reported, in ms per step and as a fraction of
  step + wait. With prefetching the loader works during the step, so the wait is ≈ max(0, load − step);
  without it the wait is the whole load time. On CUDA the time from ``next()`` until the batch is copied
  and its latents drawn on the GPU is reported too (CUDA events).

Images/s needed by the GPU = batch / step time; ``headroom`` = loader images/s ÷ needed images/s (> 1:
the loader is faster than the step). Latent datasets include the per-step draw and normalisation, on
the device. On a machine without CUDA batches stay in host memory (no pinning, no copies) and the
numbers describe the host side only.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fewstep.data.loader import BatchStream
from fewstep.sample import parse_device

log = logging.getLogger(__name__)


@dataclass
class LoaderResult:
    """One loader setting's measurements (times in ms, throughput per process)."""

    path: str                 # "in-process" (get_batch/get_stored + prefetch thread) or "dataloader"
    workers: int
    prefetch: int
    pin_memory: bool
    batch: int
    batches: int
    batches_per_s: float
    images_per_s: float
    step_ms: float = 0.0
    wait_ms: float | None = None        # mean time next() blocked the host per step under step_ms
    device_ms: float | None = None      # mean time from next() until the batch is on the GPU (copied, drawn)
    stall_fraction: float | None = None  # wait / (wait + step)
    headroom: float | None = None        # images_per_s / (batch / step)

    def line(self) -> str:
        text = (f"{self.path:10s} workers {self.workers:2d}  prefetch {self.prefetch}  pin {'on ' if self.pin_memory else 'off'}"
                f"  {self.batches_per_s:9.1f} batches/s  {self.images_per_s:11.0f} img/s")
        if self.wait_ms is not None:
            verdict = "keeps up" if self.stall_fraction < 0.05 else "STALLS the step"
            gpu = f", on the GPU after {self.device_ms:.2f} ms" if self.device_ms is not None else ""
            text += (f"  | step {self.step_ms:g} ms: wait {self.wait_ms:7.2f} ms/step ({100 * self.stall_fraction:4.1f} %)"
                     f"{gpu}, headroom {self.headroom:5.2f}× → {verdict}")
        return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(dataset: Any, *, batch: int, steps: int, warmup: int, workers: int, prefetch: int,
            pin_memory: bool | None, device: torch.device, step_ms: float = 0.0, seed: int = 0) -> LoaderResult:
    """Time one loader setting (see the module docstring)."""
    in_process = hasattr(dataset, "get_batch") or (hasattr(dataset, "get_stored") and hasattr(dataset, "realize"))
    stream = BatchStream(dataset, batch, seed=seed, num_workers=workers, device=device, pin_memory=pin_memory,
                         prefetch=prefetch)
    try:
        for _ in range(warmup):
            next(stream)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            x, _ = next(stream)
        _sync(device)
        seconds = time.perf_counter() - start
        per_worker = not in_process and workers > 0   # DataLoader prefetch_factor (≥ 1) per worker
        result = LoaderResult(path="in-process" if in_process else "dataloader", workers=0 if in_process else workers,
                              prefetch=max(prefetch, 1) if per_worker else prefetch, pin_memory=stream.pin_memory, batch=batch, batches=steps,
                              batches_per_s=steps / seconds, images_per_s=steps * batch / seconds)
        if step_ms > 0:
            waits, device_ms = [], []
            cuda = device.type == "cuda"
            for _ in range(steps):
                _sync(device)   # the loop's once-per-step host sync: the GPU is idle from here on
                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                t0 = time.perf_counter()
                x, _ = next(stream)
                waits.append(time.perf_counter() - t0)   # host blocked: the GPU waits for its next batch
                if cuda:
                    end.record()
                    end.synchronize()
                    device_ms.append(begin.elapsed_time(end))   # until the copy and the latent draw are done
                time.sleep(step_ms / 1000)   # the step holds the host; prefetching continues meanwhile
            wait = 1000 * sum(waits) / len(waits)
            result.step_ms, result.wait_ms = step_ms, wait
            result.device_ms = sum(device_ms) / len(device_ms) if device_ms else None
            result.stall_fraction = wait / (wait + step_ms)
            result.headroom = result.images_per_s / (batch / (step_ms / 1000))
    finally:
        stream.close()
    return result


def bench_data(dataset: Any, *, batch: int = 256, steps: int = 50, warmup: int = 5, workers: list[int] = (0,),
               prefetch: list[int] = (0, 2), pin_memory: bool | None = None, device: str = "auto",
               step_ms: float = 0.0) -> dict:
    """Measure every (workers, prefetch) combination on ``dataset``; returns a JSON-able report."""
    dev = parse_device(device)
    spec = dataset.spec
    in_process = hasattr(dataset, "get_batch") or hasattr(dataset, "get_stored")
    log.info(f"{spec.name}: {spec.num_items} items of {spec.channels}×{spec.resolution}² ({spec.kind}), batch {batch}, "
             f"{steps} timed batches after {warmup} warm-up, device {dev}")
    if dev.type != "cuda":
        log.info("note: no CUDA device — batches stay in host memory (no pinned memory, no host→device copy); "
                 "these numbers describe the host-side loader only")
    if in_process and any(w for w in workers):
        log.info("note: this dataset is gathered in the training process (a prefetch thread overlaps it); "
                 "DataLoader workers do not apply, so only workers=0 is measured")
        workers = [0]
    rows = []
    for w in dict.fromkeys(workers):
        for p in dict.fromkeys(prefetch):
            row = measure(dataset, batch=batch, steps=steps, warmup=warmup, workers=w, prefetch=p,
                          pin_memory=pin_memory, device=dev, step_ms=step_ms)
            rows.append(row)
            log.info(row.line())
    if step_ms > 0:
        needed = batch / (step_ms / 1000)
        best = min(rows, key=lambda r: r.wait_ms)
        log.info(f"a {step_ms:g} ms step consumes {needed:.0f} img/s per process; best setting: workers {best.workers}, "
                 f"prefetch {best.prefetch} (wait {best.wait_ms:.2f} ms/step)")
    return {"data": spec.name, "kind": spec.kind, "shape": [spec.channels, spec.resolution, spec.resolution],
            "device": str(dev), "torch": torch.__version__, "batch": batch, "steps": steps,
            "rows": [asdict(r) for r in rows]}
