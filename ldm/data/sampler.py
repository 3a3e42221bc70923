"""The training sampler: a shuffled order fixed by (seed, epoch), shared by every rank, each rank taking its part,
that can skip what an interrupted run already consumed.

Under ``main.py`` the data module gives the train loader this sampler at any world size; Lightning leaves a
`DistributedSampler` in place instead of injecting its own.
"""
from __future__ import annotations

import logging
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

logger = logging.getLogger(__name__)


def seed_host_generators(seed: int) -> None:
    """Seeds the CPU generators that data transforms use: torch's default CPU generator, numpy's, random's."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def position_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the item at `position` of epoch `epoch`'s order."""
    return (seed * 1_000_003 + epoch * 65_537 + position) % (2 ** 32)


class ResumableSampler(DistributedSampler):
    """Shuffles ``range(length)`` by ``torch.randperm`` seeded with ``seed + epoch`` (the same order on every
    rank); rank r of W takes the positions r, r + W, r + 2W, ... of that order, so each sample is seen once per
    epoch across the ranks, and a global batch (the ranks' k-th batches together) holds the same samples as the
    k-th batch of one process whose batch is W times larger.

    Ranks must run the same number of batches (each step all-reduces gradients). When the length is not a
    multiple of W, ranks get ``length // W`` or one more sample; only if that would give them different numbers of
    batches are the last ``length % W`` positions of the epoch's order left out (fewer than W samples, different
    ones every epoch, logged). Nothing is ever repeated.

    :meth:`skip` drops the first `n` positions of the epoch's order (the samples an interrupted run consumed,
    counted over all ranks), so a resumed run continues the order at any world size.

    When the dataset is read in the training process (``num_workers=0``), random transforms draw from the global
    generators; the sampler reseeds them (CPU torch, numpy, random) from (seed, epoch, position) before handing out
    each index, so an item's augmentation depends only on its position in the epoch's order, not on the rank or on
    when it was fetched.

    :param length: the dataset length.
    :param seed: the order's seed.
    :param num_replicas, rank: the world size and this process's rank (default: one process).
    :param batch_size: the per-rank batch size (to keep the ranks' batch counts equal).
    :param seed_transforms: reseed the global generators per position as described above.
    """

    def __init__(self, length: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, batch_size: int = 1,
                 seed_transforms: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__(range(int(length)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
        self.length = int(length)
        self.batch_size = max(1, int(batch_size))
        self.seed_transforms = seed_transforms
        self._skip = 0
        self.usable = self._usable_length()

    def _usable_length(self) -> int:
        w, b = self.num_replicas, self.batch_size
        batches = [-(-len(range(r, self.length, w)) // b) for r in range(w)]
        if len(set(batches)) == 1:
            return self.length
        usable = self.length - self.length % w
        if self.rank == 0:
            logger.warning("ResumableSampler: %d samples over %d ranks at batch size %d would give the ranks "
                           "different numbers of batches; the last %d positions of each epoch's shuffled order are "
                           "left out", self.length, w, b, self.length % w)
        return usable

    def skip(self, n: int) -> None:
        """The next iteration starts after the first `n` positions (over all ranks) of the current epoch's order.

        :raises ValueError: when `n` is not a multiple of the world size (the ranks consume whole global rows).
        """
        if n % self.num_replicas:
            raise ValueError(f"cannot skip {n} samples over {self.num_replicas} ranks: not a multiple")
        self._skip = int(n)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        start, self._skip = self._skip, 0
        for position in range(start + self.rank, self.usable, self.num_replicas):
            if self.seed_transforms:
                seed_host_generators(position_seed(self.seed, self.epoch, position))
            yield order[position]

    def __len__(self) -> int:
        return len(range(self.rank, self.usable, self.num_replicas))
