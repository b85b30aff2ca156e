"""One honest status line: rich progress on the main process, mirrored to ``log.jsonl``."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from accelerate import Accelerator

    from fewstep.config import RunConfig

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report throughput only.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def versions() -> dict[str, str | None]:
    """The torch and triton versions (triton ``None`` where it does not import)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


def read_log(path: str | Path) -> list[dict]:
    """Records of a ``log.jsonl`` (none if it is missing; a torn last line is ignored)."""
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def status_records(run_dir: str | Path) -> list[dict]:
    """The status records of a run's ``log.jsonl`` (one per ``train.status_kimg``: step, kimg, the
    averaged logs, throughput), without its event records."""
    return [r for r in read_log(Path(run_dir) / "log.jsonl") if "event" not in r and "kimg" in r]


def where_it_runs(accelerator: Accelerator, cfg: RunConfig) -> dict[str, Any]:
    """What a run's processes run on, for its ``start`` record: process count, device name, collective
    backend (``None`` for one process), distributed wrapper, autocast precision, torch/triton versions."""
    import torch.distributed as dist

    device = accelerator.device
    multi = accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized()
    return {"processes": accelerator.num_processes,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "backend": dist.get_backend() if multi else None,
            "distributed": cfg.train.distributed if accelerator.num_processes > 1 else None,
            "mixed_precision": str(accelerator.mixed_precision), "compile": cfg.train.compile,
            "compile_tuning": cfg.train.compile_tuning, **versions()}


def describe(start: dict[str, Any]) -> str:
    """One line for a ``start`` record: ``2 processes · NVIDIA H100 80GB HBM3 · ddp over nccl · bf16
    autocast · torch 2.11.0``."""
    n = start.get("processes", 1)
    parts = [f"{n} process" + ("es" if n != 1 else ""), str(start.get("device"))]
    if start.get("backend"):
        parts.append(f"{start.get('distributed')} over {start['backend']}")
    parts.append("bf16 autocast" if start.get("mixed_precision") == "bf16" else "fp32")
    if start.get("compile"):
        parts.append("compiled" + (" (tuned)" if start.get("compile_tuning") else ""))
    return " · ".join(parts) + f" · torch {start.get('torch')}"


def start_records(run_dir: str | Path) -> list[dict]:
    """The ``start`` event records of a run (one per launch: the first run and every resume)."""
    return [r for r in read_log(Path(run_dir) / "log.jsonl") if r.get("event") == "start"]


class StatusMeter:
    """What one status record says about the steps since the previous one: the mean of every logged value
    over the applied steps (all ranks), images/s, s/kimg, and where known TFLOP/s per GPU, MFU and peak
    memory.

    Args:
        accelerator: for the mean over ranks and the device.
        nimg: images seen when metering starts.
        flops_per_image: FLOPs of one training image (``Objective.flops_per_sample``), or ``None``.
    """

    def __init__(self, accelerator: Accelerator, nimg: int, flops_per_image: float | None):
        self.accelerator, self.flops_per_image = accelerator, flops_per_image
        self.device = accelerator.device
        self.peak = peak_flops(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset(nimg)

    def _reset(self, nimg: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.ticks, self.start, self.start_nimg = 0, time.time(), nimg

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """One applied step's logged values (skipped steps are not averaged)."""
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.ticks += 1

    def record(self, step: int, nimg: int, skipped_steps: int) -> dict[str, Any]:
        """The status record at ``step`` (one host sync), and a fresh start for the next one."""
        elapsed, images = time.time() - self.start, nimg - self.start_nimg
        record = {"step": step, "kimg": nimg / 1000,
                  **{k: float(self.accelerator.reduce(v, "mean")) / self.ticks for k, v in self.sums.items()},
                  "img_per_s": images / max(elapsed, 1e-9), "sec_per_kimg": elapsed / max(images / 1000, 1e-9),
                  "time": time.time()}
        if skipped_steps:
            record["skipped_steps"] = skipped_steps
        if self.flops_per_image:
            record["tflops"] = self.flops_per_image * record["img_per_s"] / self.accelerator.num_processes / 1e12
            if self.peak:
                record["mfu"] = record["tflops"] * 1e12 / self.peak
        if self.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._reset(nimg)
        return record


def _bar_console() -> Console | None:
    """Where a live progress bar can go: the terminal console of the rich handler ``fewstep`` logs through
    (the CLI's: log lines then print above the bar), or stderr when nothing configured logging and it is
    a terminal (``train()`` from Python). ``None`` when the output is a file or a pipe, or INFO is off."""
    from rich.logging import RichHandler

    logger = logging.getLogger("fewstep")
    handlers = [h for h in logger.handlers if getattr(h, "_fewstep", False)]
    if handlers:
        rich = next((h for h in handlers if isinstance(h, RichHandler)), None)
        ok = rich is not None and log.isEnabledFor(logging.INFO) and int(os.environ.get("RANK", "0")) == 0
        console = rich.console if ok else None
    else:
        console = Console(stderr=True)
    return console if console is not None and console.is_terminal and not console.is_dumb_terminal else None


class StatusLog:
    """Status bar (kimg, loss, images/s, ETA) and JSONL log of one run.

    Messages go through :mod:`logging` (``fewstep.train.status``): events at their level (warnings for
    skipped steps and failed saves), status lines and notes at INFO. On a terminal a rich progress bar
    moves every step (:meth:`advance`) and shows the loss of the last status record; when the output
    goes to a file or a pipe (``> log 2>&1``, sbatch, tee) every status record is logged as a plain line
    as it happens, since a live bar would show nothing until the end.

    Args:
        run_dir: where ``log.jsonl`` goes.
        total_kimg: run length, for the bar and ETA.
        start_kimg: kimg already done (resume).
        enabled: False on non-main processes (nothing is shown or written).
        show_progress: draw the bar when the output is a terminal (plain lines otherwise).
    """

    def __init__(self, run_dir: Path, total_kimg: float, start_kimg: float, enabled: bool = True,
                 show_progress: bool = True):
        self.enabled = enabled
        self._write_failed = False
        self.path = run_dir / "log.jsonl"
        self.progress = None
        console = _bar_console() if enabled and show_progress else None
        if console is not None:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[kimg]}"),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=False)
            self.task = self.progress.add_task("train", total=total_kimg, completed=start_kimg,
                                               kimg=f"{start_kimg:.1f}/{total_kimg:g} kimg", stats="")
            self.progress.start()
        self.total_kimg = total_kimg

    def _append(self, record: dict[str, Any]) -> None:
        """Append one JSON line. A failed write (a full disk, an unwritable directory) is reported once and
        never fatal, and a partly written line is cut off again, so the next record starts on a line of
        its own."""
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:
                start = f.tell()
                try:
                    f.write(line)
                    f.flush()
                except OSError:
                    f.truncate(start)
                    raise
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:
                log.warning(f"cannot append to {self.path}: {exc.strerror or exc}; training goes on (records are "
                            f"written again once it can)")
            self._write_failed = True

    def event(self, record: dict[str, Any], message: str, level: int = logging.WARNING) -> None:
        """Log an event record (``{"event": …}``) to ``log.jsonl`` and ``message`` at ``level``."""
        if not self.enabled:
            return
        self._append(record)
        log.log(level, message)

    def advance(self, kimg: float) -> None:
        """Move the bar (and so its ETA) to ``kimg``: every step, with no host sync."""
        if self.progress is not None:
            self.progress.update(self.task, completed=kimg, kimg=f"{kimg:.1f}/{self.total_kimg:g} kimg")

    def report(self, record: dict[str, Any]) -> None:
        """Show and append one status record (must hold ``kimg``)."""
        if not self.enabled:
            return
        self._append(record)
        loss = record.get("loss")
        stats = f"loss {loss:.4f}  {record.get('img_per_s', 0):.0f} img/s" if loss is not None else ""
        if "mfu" in record:
            stats += f"  MFU {100 * record['mfu']:.1f}%"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["kimg"], stats=stats,
                                 kimg=f"{record['kimg']:.1f}/{self.total_kimg:g} kimg")
        else:
            log.info(f"step {record['step']:>7d}  kimg {record['kimg']:8.3f}/{self.total_kimg:g}  {stats}")

    def print(self, message: str) -> None:
        """A note at INFO (resumed from …)."""
        if self.enabled:
            log.info(message)

    def warn(self, message: str) -> None:
        """A warning that is no event of the log (Ctrl-C heard)."""
        if self.enabled:
            log.warning(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
