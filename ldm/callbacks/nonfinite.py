"""`NonFiniteGuard`: skips optimiser steps with a NaN/Inf loss or gradient and stops after a streak of them."""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_NONFINITE = 5
NONFINITE_METRIC = "train/nonfinite_skipped"


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient."""


class NonFiniteGuard(pl.Callback):
    """Skips optimiser steps whose loss or gradients are not finite, counts them, and stops after a streak.

    Before each optimiser step (automatic or manual optimisation: Lightning calls ``on_before_optimizer_step``
    from ``opt.step()`` too), if the last backward's loss or any gradient of the optimiser's parameters is
    NaN/Inf, every gradient is set to None, so the optimiser changes neither weights nor moments. The running
    total is logged as ``train/nonfinite_skipped``. A batch counts as bad when any of its steps was skipped;
    after `max_consecutive` bad batches in a row a :class:`NonFiniteTrainingError` is raised: the weights are
    still those of the last good step, so the exception checkpoint is a good one. With several processes the ranks
    decide together: a step is skipped on every rank when any rank found a non-finite value.
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_CONSECUTIVE_NONFINITE) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ConfigError(f"lightning.reliability.max_consecutive_nonfinite must be a positive integer, "
                              f"got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.consecutive = 0
        self._loss_finite = True
        self._batch_bad = False
        self._last_bad: list[str] = []
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_bad = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_finite, self._loss_finite = self._loss_finite, True
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            params = []  # fp16 loss scaling: the scaler skips steps with inf gradients itself and lowers its scale
        grads_finite = not params or bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())
        # every rank skips when any rank's loss or gradients are not finite (else their weights would part)
        if trainer.strategy.reduce_boolean_decision(loss_finite and grads_finite, all=True):
            return
        self._last_bad = ["loss"] if not loss_finite else []
        self._last_bad += [self._names.get(id(p), "?") for p in params if not torch.isfinite(p.grad).all()]
        self._last_bad = self._last_bad or ["loss or gradients on another rank"]
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_total += 1
        self._batch_bad = True
        logger.warning("skipped optimiser step at global step %d: non-finite %s", trainer.global_step,
                       ", ".join(self._last_bad[:8]))
        pl_module.log(NONFINITE_METRIC, float(self.skipped_total), on_step=True, on_epoch=False, prog_bar=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.consecutive = self.consecutive + 1 if self._batch_bad else 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"stopping: {self.consecutive} training batches in a row had a non-finite loss or gradient "
                f"(last at global step {trainer.global_step}: {', '.join(self._last_bad[:8])}); their steps "
                f"were skipped, so the weights are those of the last finite step. Lower the learning rate, "
                f"check the data, or raise lightning.reliability.max_consecutive_nonfinite "
                f"(now {self.max_consecutive}).")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
