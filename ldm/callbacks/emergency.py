"""`EmergencyCheckpoint`: writes ``last.ckpt`` when training dies with an exception (or Ctrl-C).

The crash half of the original code's ``melk``: a crash should not lose the steps since the last regular
checkpoint; ``main.py -r <logdir>`` then resumes from ``last.ckpt``. The signal half (SIGUSR1/SIGTERM from a
cluster about to pre-empt the job) is :class:`ldm.callbacks.preemption.PreemptionCheckpoint`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

logger = logging.getLogger(__name__)


def _is_sharded(strategy: object) -> bool:
    """Whether `strategy` shards the model's state across ranks (FSDP, DeepSpeed, model parallel)."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy))


class EmergencyCheckpoint(Callback):
    """Saves ``<ckptdir>/<filename>`` when an exception (KeyboardInterrupt included) ends ``trainer.fit``.

    Nothing is saved unless at least one optimiser step was taken since training (re)started, so a crash while
    setting up or resuming never overwrites a good checkpoint with an older state.

    :param ckptdir: the run's checkpoint directory.
    :param filename: the checkpoint's file name.
    """

    def __init__(self, ckptdir: str | Path, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(ckptdir) / filename
        self._start_step: int | None = None

    def save(self, trainer: pl.Trainer, reason: str) -> Path | None:
        """Writes the checkpoint if any step was taken since training started; returns its path or None.

        In one process this is ``trainer.save_checkpoint``. With several processes the other ranks may be stuck in
        a collective (or dead), so nothing here may wait for them: ``trainer.save_checkpoint`` ends at a barrier
        that would never return, so the checkpoint is built and written by rank zero alone (other ranks have
        nothing to write: under DDP every rank holds the same state). Under a sharded strategy (FSDP) building
        the checkpoint is itself a collective, so nothing is saved; the last regular checkpoint stands.
        """
        if self._start_step is None or trainer.global_step <= self._start_step:
            logger.info("%s: no step taken since training started; not writing %s", reason, self.path)
            return None
        if trainer.world_size == 1:
            trainer.save_checkpoint(self.path)
        elif _is_sharded(trainer.strategy):
            logger.warning("%s: not writing %s: %s shards the model, and gathering it needs every rank",
                           reason, self.path, type(trainer.strategy).__name__)
            return None
        elif trainer.is_global_zero:
            # Lightning has no public way to build a checkpoint without its barrier; this is the first half of
            # trainer.save_checkpoint (which involves no collective under DDP)
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, self.path)
        else:
            return None
        logger.warning("%s: saved checkpoint at global step %d to %s", reason, trainer.global_step, self.path)
        return self.path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        try:
            self.save(trainer, f"{type(exception).__name__} during training")
        except Exception:  # the original exception is what the user must see; report this one beside it
            logger.exception("could not write the emergency checkpoint %s", self.path)
