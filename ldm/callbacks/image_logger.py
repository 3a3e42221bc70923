"""`ImageLogger`: writes the model's `log_images` as PNG grids to disk and to the experiment logger."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import FSDPStrategy

logger = logging.getLogger(__name__)


def image_grid(images: torch.Tensor, nrow: int = 4, rescale: bool = True) -> np.ndarray:
    """Tiles a batch into one uint8 picture.

    :param images: an [N x C x H x W] Tensor (C = 1 or 3) in [-1, 1] (or [0, 1] when `rescale` is False).
    :return: an [H' x W' x 3] uint8 array.
    """
    grid = torchvision.utils.make_grid(images.detach().float().cpu(), nrow=nrow)
    if rescale:
        grid = (grid + 1.0) / 2.0
    grid = grid.clamp(0.0, 1.0).permute(1, 2, 0)
    return (grid.numpy() * 255).round().astype(np.uint8)


@contextlib.contextmanager
def _whole_model(trainer: pl.Trainer, sharded: bool) -> Iterator[None]:
    """Under FSDP, gathers the root unit's parameters for a call outside the training step (the UNet's blocks
    gather their own when called); every rank must take part. Elsewhere, nothing."""
    if not sharded:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=False):
        yield


class ImageLogger(Callback):
    """Every `batch_frequency` steps, calls ``pl_module.log_images(batch, split=..., **log_images_kwargs)``,
    which returns a dict of [N x C x H x W] Tensors in [-1, 1], and writes each entry as
    ``<root>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png`` (root: the trainer's
    ``default_root_dir``, the run's log dir under ``main.py``), and to every logger that takes images
    (TensorBoard's ``add_image``, W&B's ``log_image``). Only rank zero logs; under FSDP, whose ranks each hold a
    shard of the model, every rank computes the images (with the model gathered) and rank zero writes them.

    :param batch_frequency: log every this many steps (global steps, or batch indices if `log_on_batch_idx`).
    :param max_images: at most this many images of each entry; 0 disables logging.
    :param clamp: clamp the images to [-1, 1] first.
    :param increase_log_steps: also log at steps 1, 2, 4, 8, ... below `batch_frequency`.
    :param rescale: map [-1, 1] to [0, 1] before saving (turn off for models that return [0, 1]).
    :param disabled: log nothing.
    :param log_on_batch_idx: count batch indices instead of global steps.
    :param log_first_step: also log at step 0.
    :param log_images_kwargs: extra keyword arguments of `log_images` (e.g. ``ddim_steps``).
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"ImageLogger: batch_frequency must be >= 1, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        if increase_log_steps:
            self.log_steps = {2 ** n for n in range(int(math.log2(batch_frequency)) + 1)}
        else:
            self.log_steps = {batch_frequency}
        self._last_logged: dict[str, int] = {}

    def check_frequency(self, check_idx: int) -> bool:
        """Whether step (or batch index) `check_idx` is one to log at."""
        if check_idx == 0 and not self.log_first_step:
            return False
        return check_idx % self.batch_freq == 0 or check_idx in self.log_steps

    def log_local(self, save_dir: str | Path, split: str, images: Mapping[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> list[Path]:
        """Writes one PNG grid per entry of `images`; returns the paths written."""
        root = Path(save_dir) / "images" / split
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for key, value in images.items():
            path = root / f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(image_grid(value, rescale=self.rescale)).save(path)
            paths.append(path)
        return paths

    def _log_to_loggers(self, trainer: pl.Trainer, split: str, images: Mapping[str, torch.Tensor]) -> None:
        for key, value in images.items():
            grid = image_grid(value, rescale=self.rescale)
            tag = f"{split}/{key}"
            for lg in trainer.loggers:
                experiment = getattr(lg, "experiment", None)
                if hasattr(lg, "log_image"):
                    lg.log_image(key=tag, images=[grid], step=trainer.global_step)
                elif hasattr(experiment, "add_image"):
                    experiment.add_image(tag, grid, global_step=trainer.global_step, dataformats="HWC")

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> None:
        """Calls `log_images` and writes the result, when this step is one to log at."""
        check_idx = batch_idx if self.log_on_batch_idx else trainer.global_step
        sharded = isinstance(trainer.strategy, FSDPStrategy)
        if (self.disabled or self.max_images <= 0 or not callable(getattr(pl_module, "log_images", None))
                or not (trainer.is_global_zero or sharded) or self._last_logged.get(split) == check_idx
                or not self.check_frequency(check_idx)):
            return
        self._last_logged[split] = check_idx
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), _whole_model(trainer, sharded):
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        selected = {}
        for key, value in images.items():
            if not isinstance(value, torch.Tensor) or value.ndim != 4:
                continue
            value = value[: self.max_images].detach().float().cpu()
            selected[key] = value.clamp(-1.0, 1.0) if self.clamp else value
        self.log_local(trainer.default_root_dir, split, selected, trainer.global_step, trainer.current_epoch,
                       batch_idx)
        self._log_to_loggers(trainer, split, selected)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking and trainer.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")
