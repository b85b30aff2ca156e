"""A deterministic, resumable, sharded stream of training batches.

The global index stream is the concatenation of one ``torch.randperm(N)`` per epoch, each drawn from a
generator seeded with (seed, epoch), so sample ``q`` of the stream is ``perm[q // N][q % N]`` whatever
happened before. Global batch ``k`` covers stream positions ``[k·G, (k + 1)·G)`` with
``G = batch_size · world_size``; rank ``r`` takes positions ``k·G + r + j·world_size`` for
``j < batch_size`` (a strided share). Batches cross epoch boundaries: nothing is dropped or padded.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fewstep.data.base import check_item

_MIX = 0x9E3779B97F4A7C15   # golden-ratio constant: decorrelates (seed, epoch) pairs


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

    Yields x (batch_size, C, H, W) float32 in [−1, 1] and y (batch_size,) int64 on ``device``. Datasets
    with ``get_batch`` are indexed in the calling process (no workers); others go through a
    ``DataLoader`` with ``num_workers`` workers (pinned memory when ``device`` is CUDA).

    Args:
        dataset: map-style dataset of ``(x, y)`` items.
        batch_size: samples per rank per batch.
        seed: seed of the index order (the same on every rank).
        rank, world_size: this rank's strided share of each global batch of batch_size · world_size.
        num_workers: DataLoader workers for datasets without ``get_batch``.
        device: where batches go (``non_blocking`` copies), or ``None`` to leave them on the CPU.
        start_position: a saved :attr:`position`, to continue the exact same stream.

    Attributes:
        position: global samples consumed so far (all ranks together); save it to resume.
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, device: torch.device | str | None = None, start_position: int = 0):
        self.dataset = dataset
        self.indices = IndexStream(len(dataset), batch_size, seed, rank, world_size, start_position)
        self.device = torch.device(device) if device is not None else None
        self.position = int(start_position)
        self.num_workers = num_workers
        self._batches: Iterator[tuple[Tensor, Tensor]] | None = None

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
        spec = getattr(self.dataset, "spec", None)
        if spec is not None:   # cheap: a shape compare and two reductions over B labels
            check_item(x, y, spec, f"batch at stream position {self.position}")
        self.position += self.indices.global_batch
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x, y

    def _start(self) -> Iterator[tuple[Tensor, Tensor]]:
        if hasattr(self.dataset, "get_batch"):
            start, step = self.indices.start_position, self.indices.global_batch
            return (self.dataset.get_batch(self.indices.batch_at(p)) for p in itertools.count(start, step))
        pin = self.device is not None and self.device.type == "cuda"
        dataset = CheckedItems(self.dataset) if hasattr(self.dataset, "spec") else self.dataset
        loader = DataLoader(dataset, batch_sampler=self.indices, num_workers=self.num_workers,
                            pin_memory=pin, persistent_workers=self.num_workers > 0)
        return iter(loader)
