"""`StepProgressBar`: one progress bar for a whole training run, in optimiser steps, instead of one per epoch
and one per validation."""
from __future__ import annotations

import math
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar
from tqdm.auto import tqdm


class StepProgressBar(ProgressBar):
    """A single tqdm bar from step 0 to ``trainer.max_steps`` (or the epochs' batches when no step limit is set),
    with the progress-bar metrics (``self.log(..., prog_bar=True)``) as its postfix; validation runs without a
    bar of its own. Select it in a config as ``lightning.callbacks.progress_bar.target:
    ldm.callbacks.StepProgressBar`` (Lightning then uses it instead of its default bar).

    :param description: the text before the bar.
    :param metrics: the progress-bar metrics to show (default: all of them), e.g. ``[train/loss_simple_step]``.
    :param leave: keep the finished bar on the screen.
    """

    def __init__(self, description: str = "training", metrics: list[str] | None = None, leave: bool = True) -> None:
        super().__init__()
        self.description = description
        self.metrics = list(metrics) if metrics is not None else None
        self.leave = leave
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
            return int(batches) * int(trainer.max_epochs)
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self._bar = tqdm(total=self._total(trainer), initial=trainer.global_step, desc=self.description,
                             unit="step", dynamic_ncols=True, leave=self.leave, file=sys.stderr)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        metrics = self.get_metrics(trainer, pl_module)
        shown = {k: v for k, v in metrics.items() if self.metrics is None or k in self.metrics}
        self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()},
                              refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's messages (e.g. the checkpoint callback's) above the bar rather than through it."""
        (self._bar.write if self._bar is not None else tqdm.write)(" ".join(map(str, args)), **kwargs)
