"""`DataModuleFromConfig`: a Lightning data module whose splits are datasets built from config.

Configs name it as ``main.DataModuleFromConfig`` (re-exported by ``main.py``) or
``ldm.datamodule.DataModuleFromConfig``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.sampler import ItemSeededDataset, ResumableSampler
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """Wraps any object with ``__len__`` and ``__getitem__`` into a torch Dataset."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


class StreamLoader:
    """A DataLoader over an IterableDataset (a stream), for training at any world size.

    Ranks read disjoint parts of a stream (see :mod:`ldm.data.webdataset`), which rarely hold the same number of
    samples; a rank whose part ends first would start its next epoch while the others still train this one, and
    their collectives (gradient all-reduces) would pair up different steps. So, with `agree` (a vote over all ranks
    that is true when every rank votes true), each batch is handed out only when every rank has one, and the epoch
    ends for all ranks when the shortest part ends; what the other ranks had left of that epoch is not used (they
    log it). It also passes the epoch to the dataset's ``set_epoch`` (Lightning calls
    ``set_epoch`` on a loader's sampler, and a stream has none).

    :param loader: the DataLoader of the stream (its workers are recreated every epoch, so they see the epoch).
    :param agree: the vote; None in a single process.
    """

    def __init__(self, loader: DataLoader, agree: Callable[[bool], bool] | None = None) -> None:
        self.loader = loader
        self.agree = agree
        self.batch_size = loader.batch_size

    @property
    def sampler(self) -> StreamLoader:
        """Itself: Lightning looks for ``set_epoch`` on a loader's sampler."""
        return self

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.loader.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        end = object()
        batches = iter(self.loader)
        while True:
            batch = next(batches, end)
            if self.agree is not None and not self.agree(batch is not end):
                if batch is not end:
                    logger.info("the stream of another rank ended first: this rank ends its epoch here, leaving the "
                                "rest of its part of the stream unused in this epoch")
                return
            if batch is end:
                return
            yield batch


def worker_init_fn(worker_id: int) -> None:
    """Gives each data-loader worker its own numpy seed, derived from the torch seed of that worker."""
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


class DataModuleFromConfig(pl.LightningDataModule):
    """Builds the `train` / `validation` / `test` / `predict` datasets from their configs.

    :param batch_size: batch size of every loader.
    :param train, validation, test, predict: dataset configs (``target`` + ``params``); a split without a
        config has no loader.
    :param wrap: wrap each dataset in :class:`WrappedDataset` (for objects that are not torch Datasets).
    :param num_workers: loader workers; ``2 * batch_size`` when not given, as in the original.
    :param shuffle_test_loader, shuffle_val_dataloader: shuffle those splits (the train split is always
        shuffled unless it is an IterableDataset).
    :param use_worker_init_fn: seed numpy per worker (iterable datasets always are).
    """

    def __init__(self, batch_size: int, train: Mapping | None = None, validation: Mapping | None = None,
                 test: Mapping | None = None, predict: Mapping | None = None, wrap: bool = False,
                 num_workers: int | None = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader,
                        "predict": False}
        configs = dict(train=train, validation=validation, test=test, predict=predict)
        self.dataset_configs = {k: v for k, v in configs.items() if v is not None}
        self.datasets: dict[str, Any] = {}

    def train_dataloader(self) -> DataLoader | StreamLoader | list:
        return self._dataloader("train")

    def val_dataloader(self) -> DataLoader | StreamLoader | list:
        return self._dataloader("validation")

    def test_dataloader(self) -> DataLoader | StreamLoader | list:
        return self._dataloader("test")

    def predict_dataloader(self) -> DataLoader | StreamLoader | list:
        return self._dataloader("predict")

    def prepare_data(self) -> None:
        """Builds each dataset once on the main process, so that downloads or index building happen there."""
        for config in self.dataset_configs.values():
            instantiate_from_config(config)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split, config in self.dataset_configs.items():
            dataset = instantiate_from_config(config)
            self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset
            size = len(dataset) if hasattr(dataset, "__len__") else "streamed"
            logger.info("data %s: %s, %s items", split, type(dataset).__name__, size)

    def _dataloader(self, split: str) -> DataLoader | StreamLoader | list:
        """The split's loader; an empty list (which Lightning reads as "no loader") for a split without a config.

        The train split of a map-style dataset is drawn by a :class:`~ldm.data.sampler.ResumableSampler`: one
        shuffled order per epoch that depends only on the seed and the epoch, split over the ranks when there are
        several, so a resumed run continues it exactly (Lightning keeps this sampler instead of injecting its own);
        each item's random augmentation is seeded by (seed, epoch, index)
        (:class:`~ldm.data.sampler.ItemSeededDataset`).
        The train split of a stream is a :class:`StreamLoader`.
        """
        if split not in self.dataset_configs:
            return []
        if not self.datasets:
            self.setup()
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        init_fn = worker_init_fn if (iterable or self.use_worker_init_fn) else None
        shuffle = self.shuffle[split] and not iterable
        sampler = None
        if shuffle and split == "train":
            sampler, dataset = self._train_sampler(len(dataset)), ItemSeededDataset(dataset)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            shuffle=shuffle and sampler is None, sampler=sampler, worker_init_fn=init_fn,
                            persistent_workers=self.num_workers > 0 and split == "train" and not iterable)
        if iterable and split == "train":
            return StreamLoader(loader, agree=self._vote())
        return loader

    def _vote(self) -> Callable[[bool], bool] | None:
        """A vote over the ranks of the trainer's strategy (None in a single process)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return lambda flag: bool(trainer.strategy.reduce_boolean_decision(flag, all=True))

    def _train_sampler(self, length: int) -> ResumableSampler:
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableSampler(length, seed=seed, num_replicas=world, rank=rank, batch_size=self.batch_size,
                                item_seeds=True)
