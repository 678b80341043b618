"""A resumable sampler whose order depends only on ``(seed, epoch)``.

Exact resume needs two things from the data pipeline: the example order of an epoch must be a
pure function of the seed and the epoch number (not of how many random numbers were drawn
before), and the loader must be able to start in the middle of an epoch. :class:`EpochSampler`
gives both, and shards the order across processes (like ``DistributedSampler``: padded to a
multiple of the world size, then strided by rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Seeded per-epoch permutation of ``range(num_examples)``, sharded by rank, skippable.

    Args:
        num_examples: dataset length.
        seed: base seed; epoch ``e`` uses a generator seeded with ``seed * 1_000_003 + e``.
        shuffle: permute (training) or keep the natural order (evaluation).
        num_replicas, rank: process count and index (``accelerator.num_processes`` /
            ``process_index``).
    """

    def __init__(
        self, num_examples: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` indices of this rank's order (resume mid-epoch)."""
        self.start = int(start)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.num_examples / self.num_replicas) if self.num_examples else 0

    def order(self, epoch: int) -> list[int]:
        """This rank's full index order for ``epoch`` (before skipping)."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed * 1_000_003 + epoch)
            indices = torch.randperm(self.num_examples, generator=gen).tolist()
        else:
            indices = list(range(self.num_examples))
        total = self.per_rank * self.num_replicas
        if total > len(indices) and indices:
            indices += indices[: total - len(indices)]
        return indices[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)
