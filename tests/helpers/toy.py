"""A tiny LightningModule and dataset for testing the training CLI without the real models."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset


class ToyDataset(Dataset):
    """`size` fixed random images: items are {"image": a [C x H x W] Tensor in [-1, 1]}."""

    def __init__(self, size: int = 16, image_size: int = 8, channels: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, channels, image_size, image_size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i]}


class ToyStream(IterableDataset):
    """Items {"image": a [1 x 2 x 2] Tensor filled with i} for i = 0 .. length - 1, in order."""

    def __init__(self, length: int = 5) -> None:
        self.length = length

    def __iter__(self):
        return iter({"image": torch.full((1, 2, 2), float(i))} for i in range(self.length))


class ToyModel(pl.LightningModule):
    """A one-convolution auto-encoder trained to reproduce its input.

    :param manual: use manual optimisation with two optimisers (like the GAN-trained autoencoders).
    :param monitor: metric name for checkpointing (read by main.py as the original does).
    :param fail_at_step: raise RuntimeError in the training step at this global step.
    :param signal_at_step: send SIGUSR1 to this process in the training step at this global step.
    :param step_log: append "<global_step>" to this file at every training step.
    """

    def __init__(self, channels: int = 3, manual: bool = False, monitor: str | None = None,
                 fail_at_step: int | None = None, signal_at_step: int | None = None,
                 step_log: str | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.critic = torch.nn.Conv2d(channels, 1, 3, padding=1)
        self.automatic_optimization = not manual
        self.monitor = monitor
        self.fail_at_step = fail_at_step
        self.signal_at_step = signal_at_step
        self.step_log = step_log
        self.learning_rate = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: dict) -> torch.Tensor:
        x = batch["image"]
        return F.mse_loss(self(x), x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        step = self.global_step
        if self.step_log:
            with open(self.step_log, "a") as f:
                f.write(f"{step}\n")
        if self.signal_at_step == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.fail_at_step == step:
            raise RuntimeError(f"toy failure at step {step}")
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=False)
        if self.automatic_optimization:
            return loss
        opt_g, opt_d = self.optimizers()
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        critic_loss = self.critic(batch["image"]).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(critic_loss)
        opt_d.step()
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.learning_rate)
        if self.automatic_optimization:
            return opt
        return [opt, torch.optim.SGD(self.critic.parameters(), lr=self.learning_rate)]

    def log_images(self, batch: dict, split: str = "train", **kwargs) -> dict:
        x = batch["image"]
        return {"inputs": x, "reconstructions": self(x)}


def read_steps(path: str | Path) -> list[int]:
    """The global steps a ToyModel wrote to its `step_log`."""
    return [int(line) for line in Path(path).read_text().split()]
