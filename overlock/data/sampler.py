"""Samplers that make a run resumable mid-epoch and identical however it is split over processes."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .folder import sample_seed


class ResumableSampler(torch.utils.data.Sampler):
    """Training order: a permutation per (seed, epoch), sharded over ranks, whole batches only.

    Yields ``(index, sample_seed)`` pairs. ``set_epoch(epoch, start_batch)`` skips the batches already trained,
    so a run resumed from a mid-epoch checkpoint sees exactly the samples (and augmentations) it would have seen.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch size {batch_size} x {world_size} process(es) is larger than the training split "
                             f"({num_samples} images): lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        per_step = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            # global positions of this rank's samples in batch b (rank-major within the step)
            first = b * per_step + self.rank * self.batch_size
            for pos in range(first, first + self.batch_size):
                yield perm[pos], sample_seed(self.seed, self.epoch, pos)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order: every sample exactly once over all ranks (no padding, so metrics are exact)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
