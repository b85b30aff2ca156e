"""A deterministic, resumable, sharded stream of training batches.

The global index stream is the concatenation of one ``torch.randperm(N)`` per epoch, each drawn from a
generator seeded with (seed, epoch), so sample ``q`` of the stream is ``perm[q // N][q % N]`` whatever
happened before. Global batch ``k`` covers stream positions ``[k·G, (k + 1)·G)`` with
``G = batch_size · world_size``; rank ``r`` takes positions ``k·G + r + j·world_size`` for
``j < batch_size`` (a strided share). Batches cross epoch boundaries: nothing is dropped or padded.

Datasets with a random draw per item (prepared latents: ``get_stored`` + ``realize``) get their noise from
a generator seeded with (seed, rank, position) on the training device, so a resumed run draws the same
latents. In-process batches are prefetched by a background thread into pinned memory (on CUDA by
default), so the host-side gather overlaps the GPU step.
"""
from __future__ import annotations

import itertools
import queue
import threading
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fewstep.data.base import check_item

_MIX = 0x9E3779B97F4A7C15   # golden-ratio constant: decorrelates (seed, epoch) pairs
_MASK = (1 << 64) - 1


def noise_seed(seed: int, rank: int, position: int) -> int:
    """Seed of the per-item draws of the batch rank ``rank`` takes at stream ``position`` (splitmix64)."""
    z = 0
    for part in (seed, rank, position, 0x1A7E47):
        z = (z + part * _MIX + _MIX) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
    return z >> 1


class CheckedItems(Dataset):
    """A view of a dataset whose items are checked against its spec, so an image of another size or
    channel count is reported with its index instead of failing inside batch collation."""

    def __init__(self, dataset: Any):
        self.dataset, self.spec = dataset, dataset.spec

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.dataset[index]
        check_item(x, y, self.spec, index)
        return x, y


def epoch_permutation(num_items: int, seed: int, epoch: int) -> Tensor:
    """The (num_items,) int64 index order of ``epoch``, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed((seed * _MIX + epoch) % (1 << 63))
    return torch.randperm(num_items, generator=generator)


class IndexStream:
    """Per-rank batches of dataset indices, forever, from global stream position ``start_position``.

    Args:
        num_items: dataset size N.
        batch_size: indices per rank per batch.
        seed: seed of the epoch permutations (the same on every rank).
        rank, world_size: this rank's share of each global batch.
        start_position: global samples already consumed (a multiple of batch_size · world_size).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_position: int = 0):
        if num_items < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"need num_items, batch_size, world_size ≥ 1, got {num_items}, {batch_size}, "
                             f"{world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        global_batch = batch_size * world_size
        if start_position < 0 or start_position % global_batch:
            raise ValueError(f"start_position {start_position} is not a non-negative multiple of the global "
                             f"batch {batch_size}·{world_size} = {global_batch}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.global_batch = rank, world_size, global_batch
        self.start_position = start_position
        self._perms: dict[int, Tensor] = {}

    def batch_at(self, position: int) -> Tensor:
        """(batch_size,) int64 indices of this rank's share of the global batch starting at ``position``."""
        q = position + self.rank + torch.arange(self.batch_size) * self.world_size
        epochs, offsets = q // self.num_items, q % self.num_items
        out = torch.empty(self.batch_size, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._perm(epoch)[offsets[mask]]
        return out

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
            self._perms[epoch] = epoch_permutation(self.num_items, self.seed, epoch)
        return self._perms[epoch]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_position
        while True:
            yield self.batch_at(position).tolist()
            position += self.global_batch


class BatchStream:
    """Endless ``(x, y)`` training batches for one rank, resumable from :attr:`position`.

    Yields x (batch_size, C, H, W) float32 and y (batch_size,) int64 on ``device``. Three dataset paths:

    * ``get_stored`` + ``realize`` (prepared latents): the stored posterior is gathered in this process,
      moved to ``device``, and ``realize`` draws a fresh latent there from a generator seeded with
      :func:`noise_seed` (seed, rank, position) (on the CPU the draw happens with the gather).
    * ``get_batch`` (in-memory images): indexed in this process.
    * anything else: a ``DataLoader`` with ``num_workers`` worker processes.

    Args:
        dataset: map-style dataset of ``(x, y)`` items.
        batch_size: samples per rank per batch.
        seed: seed of the index order and of the per-item draws (the same on every rank).
        rank, world_size: this rank's strided share of each global batch of batch_size · world_size.
        num_workers: DataLoader workers for datasets without ``get_batch``/``get_stored``.
        device: where batches go (``non_blocking`` copies), or ``None`` to leave them on the CPU.
        start_position: a saved :attr:`position`, to continue the exact same stream.
        pin_memory: page-lock host batches (default: when ``device`` is CUDA; never without CUDA).
        prefetch: batches prepared ahead: by a background thread for the in-process paths and for a
            DataLoader without workers, per worker otherwise (default: 2 when ``device`` is CUDA, else 0).

    Attributes:
        position: global samples consumed so far (all ranks together); save it to resume.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, device: torch.device | str | None = None, start_position: int = 0,
                 *, pin_memory: bool | None = None, prefetch: int | None = None):
        self.dataset = dataset
        self.indices = IndexStream(len(dataset), batch_size, seed, rank, world_size, start_position)
        self.device = torch.device(device) if device is not None else None
        cuda = self.device is not None and self.device.type == "cuda"
        self.position = int(start_position)
        self.num_workers = num_workers
        self.pin_memory = (cuda if pin_memory is None else bool(pin_memory)) and torch.cuda.is_available()
        self.prefetch = (2 if cuda else 0) if prefetch is None else int(prefetch)
        self.stochastic = hasattr(dataset, "get_stored") and hasattr(dataset, "realize")
        self._realize_on_host = self.stochastic and (self.device is None or self.device.type == "cpu")
        self._batches: Iterator[tuple[Tensor, Tensor]] | None = None
        self._prefetcher: _Prefetcher | None = None
        self._generator: torch.Generator | None = None

    @property
    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.position / self.indices.num_items

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self._batches is None:
            self._batches = self._start()
        x, y = next(self._batches)
        if not self.stochastic and not hasattr(self.dataset, "get_batch"):
            spec = getattr(self.dataset, "spec", None)
            if spec is not None:   # cheap: a shape compare and two reductions over B labels
                check_item(x, y, spec, f"batch at stream position {self.position}")
        position = self.position
        self.position += self.indices.global_batch
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        if self.stochastic and not self._realize_on_host:
            x = self.dataset.realize(x, self._noise(position, x.device))
        return x, y

    def close(self) -> None:
        """Stop the prefetch thread (if any); the stream restarts from :attr:`position` on the next batch."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher, self._batches = None, None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _noise(self, position: int, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device)
        return self._generator.manual_seed(noise_seed(self.indices.seed, self.indices.rank, position))

    def _noise_on_host(self, position: int) -> torch.Generator:
        """A fresh CPU generator (the prefetch thread's own) seeded like :meth:`_noise`."""
        return torch.Generator().manual_seed(noise_seed(self.indices.seed, self.indices.rank, position))

    def _host_batch(self, position: int) -> tuple[Tensor, Tensor]:
        """The checked CPU batch at ``position`` (stored posterior or images), pinned if asked."""
        indices = self.indices.batch_at(position)
        spec = getattr(self.dataset, "spec", None)
        if self.stochastic:
            x, y = self.dataset.get_stored(indices)
            view = x[:, :spec.channels] if spec is not None else x
        else:
            x, y = self.dataset.get_batch(indices)
            view = x
        if spec is not None:
            check_item(view, y, spec, f"batch at stream position {position}")
        if self._realize_on_host:   # CPU training: draw here, so the prefetch thread overlaps it too
            x = self.dataset.realize(x, self._noise_on_host(position))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _start(self) -> Iterator[tuple[Tensor, Tensor]]:
        workers = self.num_workers > 0
        if self.stochastic or hasattr(self.dataset, "get_batch"):
            positions = itertools.count(self.position, self.indices.global_batch)
            source = _host_batches(weakref.WeakMethod(self._host_batch), positions)
        else:
            dataset = CheckedItems(self.dataset) if hasattr(self.dataset, "spec") else self.dataset
            self.indices.start_position = self.position
            loader = DataLoader(dataset, batch_sampler=self.indices, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, persistent_workers=workers,
                                prefetch_factor=max(self.prefetch, 1) if workers else None)
            source = iter(loader)
            if workers:   # the workers prefetch
                return source
        if self.prefetch > 0:
            self._prefetcher = _Prefetcher(source, self.prefetch)
            return iter(self._prefetcher)
        return source


def _host_batches(produce: weakref.WeakMethod, positions: Iterator[int]) -> Iterator[Any]:
    """``produce(position)`` for successive positions, holding ``produce`` weakly (so a stream that is
    dropped without :meth:`BatchStream.close` ends its prefetch thread)."""
    for position in positions:
        fn = produce()
        if fn is None:
            return
        batch = fn(position)
        fn = None
        yield batch


class _Prefetcher:
    """Pulls batches from ``source`` in a daemon thread, ``depth`` ahead; an error is raised in the
    consumer at the batch where it happened."""

    def __init__(self, source: Iterator[Any], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="fewstep-prefetch")
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        while not self._stop.is_set():
            try:
                item = (True, next(source))
            except StopIteration:
                return
            except BaseException as exc:   # delivered to the consumer, which raises it
                item = (False, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def __iter__(self) -> Iterator[Any]:
        while True:
            ok, value = self._queue.get()
            if not ok:
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1)
