"""The training sampler: a shuffled order fixed by (seed, epoch), shared by every rank, each rank taking its part,
that can skip what an interrupted run already consumed; and the dataset wrapper that makes each item's random
augmentation a function of (seed, epoch, index).

Under ``main.py`` the data module gives the train loader both at any world size; Lightning leaves a
`DistributedSampler` in place instead of injecting its own.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

logger = logging.getLogger(__name__)


def seed_host_generators(seed: int) -> None:
    """Seeds the CPU generators that data transforms use: torch's default CPU generator, numpy's, random's."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset item `index` in epoch `epoch` of a run seeded with `seed`."""
    return (seed * 1_000_003 + epoch * 65_537 + index) % (2 ** 32)


class ItemSeededDataset(Dataset):
    """A map-style dataset read with keys ``(index, seed)`` (from a :class:`ResumableSampler` with
    ``item_seeds=True``): the host generators (CPU torch, numpy, random) are seeded with `seed` before item `index`
    is read, so its random transforms depend only on (run seed, epoch, index): not on the rank, the batch size,
    the loader worker, or when it was fetched.

    :param dataset: any map-style dataset.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_host_generators(seed)
        return self.dataset[index]


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

    With ``item_seeds`` it yields ``(index, item_seed(seed, epoch, index))`` for an :class:`ItemSeededDataset`.

    :param length: the dataset length.
    :param seed: the order's seed.
    :param num_replicas, rank: the world size and this process's rank (default: one process).
    :param batch_size: the per-rank batch size (to keep the ranks' batch counts equal).
    :param item_seeds: yield (index, seed) pairs instead of indices.
    """

    def __init__(self, length: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, batch_size: int = 1,
                 item_seeds: bool = False) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        super().__init__(range(int(length)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
        self.length = int(length)
        self.batch_size = max(1, int(batch_size))
        self.item_seeds = item_seeds
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

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        start, self._skip = self._skip, 0
        for position in range(start + self.rank, self.usable, self.num_replicas):
            index = order[position]
            yield (index, item_seed(self.seed, self.epoch, index)) if self.item_seeds else index

    def __len__(self) -> int:
        return len(range(self.rank, self.usable, self.num_replicas))
