"""`ResumeDataOrder`: a run resumed in the middle of an epoch continues that epoch's data order, at any world size."""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

from ldm.data.sampler import ResumableSampler

logger = logging.getLogger(__name__)


class ResumeDataOrder(pl.Callback):
    """On a mid-epoch resume, makes :class:`~ldm.data.sampler.ResumableSampler` skip the samples consumed before the
    interruption.

    Lightning restores the batch counter of the interrupted epoch but starts the epoch's data iterator from the
    beginning; without this the resumed run would see the epoch's first batches twice. The checkpoint records the
    world size and per-rank batch size it was written with (this callback's state), so the consumed samples are
    counted over all ranks: ``batches done * batch size * world size``. A run written at world size 2 and resumed
    at world size 1 (or the other way round) continues the same shuffled order without repeating a sample; with the
    same global batch (e.g. batch size doubled at world size 1) it takes the same steps.
    """

    def __init__(self) -> None:
        self.world_size = 1
        self.batch_size = 1
        self._saved: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = {k: int(v) for k, v in state_dict.items() if k in ("world_size", "batch_size")}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        self.world_size = trainer.world_size
        self.batch_size = getattr(loader, "batch_size", None) or 1
        saved, self._saved = self._saved or {}, None
        # as restored from the checkpoint: batches of the interrupted epoch whose step was taken ("completed"
        # lags by one when the checkpoint was written at a batch end)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.fit_loop.epoch_progress.current
        if done <= 0 or epoch.processed > epoch.completed:
            return  # nothing consumed, or the checkpoint was written at an epoch end: the next epoch starts afresh
        consumed = done * saved.get("batch_size", self.batch_size) * saved.get("world_size", self.world_size)
        sampler = find_resumable_sampler(loader)
        if sampler is None:
            logger.warning("resuming in the middle of an epoch (%d samples done) with a sampler that cannot skip "
                           "them; the data order of this epoch will differ from an uninterrupted run", consumed)
            return
        if consumed >= sampler.usable:
            return
        if consumed % sampler.num_replicas:
            logger.warning("resuming mid-epoch: %d samples done is not a multiple of the world size %d; skipping "
                           "%d", consumed, sampler.num_replicas, consumed - consumed % sampler.num_replicas)
            consumed -= consumed % sampler.num_replicas
        sampler.skip(consumed)
        logger.info("resuming mid-epoch: skipping the %d samples of this epoch's order that were already seen",
                    consumed)


def find_resumable_sampler(loader: Any) -> ResumableSampler | None:
    """The :class:`ResumableSampler` of a DataLoader (as its sampler or its batch sampler's), if it has one."""
    for obj in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(obj, ResumableSampler):
            return obj
    return None
