"""`EmergencyCheckpoint`: writes ``last.ckpt`` when training dies with an exception or on SIGUSR1.

The original code's ``melk``: a cluster that is about to pre-empt a job sends SIGUSR1; a crash or Ctrl-C should
not lose the steps since the last regular checkpoint. ``main.py -r <logdir>`` then resumes from ``last.ckpt``.
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

logger = logging.getLogger(__name__)


class EmergencyCheckpoint(Callback):
    """Saves ``<ckptdir>/<filename>`` on an exception during fit, and at the end of the first training batch
    after the process receives `signum` (SIGUSR1).

    The signal handler only sets a flag (saving inside a handler could catch the model mid-update) and then
    calls the handler that was installed before it, so Lightning's SLURM auto-requeue keeps working. Nothing is
    saved unless at least one optimiser step was taken since training (re)started, so a crash while resuming
    never overwrites a good checkpoint with an older state.

    :param ckptdir: the run's checkpoint directory.
    :param filename: the checkpoint's file name.
    :param signum: the signal that asks for a checkpoint.
    """

    def __init__(self, ckptdir: str | Path, filename: str = "last.ckpt", signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.path = Path(ckptdir) / filename
        self.signum = signum
        self.requested = False
        self._start_step: int | None = None
        self._previous_handler: Any = None
        self._installed = False

    def _handle_signal(self, signum: int, frame: Any) -> None:
        self.requested = True
        if callable(self._previous_handler):
            self._previous_handler(signum, frame)

    def save(self, trainer: pl.Trainer, reason: str) -> Path | None:
        """Writes the checkpoint if any step was taken since training started; returns its path or None.

        Uses the strategy's writer directly instead of ``trainer.save_checkpoint``: the latter waits at a
        barrier for every rank, which deadlocks when only one rank failed.
        """
        if self._start_step is None or trainer.global_step <= self._start_step:
            logger.info("%s: no step taken since training started; not writing %s", reason, self.path)
            return None
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(checkpoint, self.path)
        logger.warning("%s: saved checkpoint at global step %d to %s", reason, trainer.global_step, self.path)
        return self.path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.getsignal(self.signum)
            signal.signal(self.signum, self._handle_signal)
            self._installed = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.requested:
            self.requested = False
            self.save(trainer, f"signal {signal.Signals(self.signum).name}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        try:
            self.save(trainer, f"{type(exception).__name__} during training")
        except Exception:  # the original exception is what the user must see; report this one beside it
            logger.exception("could not write the emergency checkpoint %s", self.path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous_handler if self._previous_handler is not None
                          else signal.SIG_DFL)
            self._installed = False
