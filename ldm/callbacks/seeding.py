"""`StepSeeding`: the random state of every training step is a function of (seed, global step, rank)."""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


class StepSeeding(pl.Callback):
    """Reseeds the global random generators (torch on every device, numpy, random) before every training batch
    from (seed, global step, rank), so a resumed run draws the same noise, timesteps and dropout masks as an
    uninterrupted one, whatever data loading or validation consumed in between.

    :param seed: the run's seed; by default the one ``seed_everything`` set (``PL_GLOBAL_SEED``).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        step_seed = (base * 1_000_003 + trainer.global_step * 8191 + trainer.global_rank) % (2 ** 32)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed)
        random.seed(step_seed)
