"""StepProgressBar: one bar over the whole run in optimiser steps, with the chosen metrics, and no validation bars."""
from __future__ import annotations

import re

import pytorch_lightning as pl
import torch

from ldm.callbacks import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/other", 1.0, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch[0]).pow(2).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_one_bar_over_all_epochs_with_chosen_metrics(capsys):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 batches
    bar = StepProgressBar(description="stage X", metrics=["train/loss"])
    trainer = pl.Trainer(max_steps=10, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[bar])
    assert trainer.progress_bar_callback is bar  # Lightning's own bar is replaced
    trainer.fit(_Tiny(), data, data)
    err = capsys.readouterr().err
    frames = [f for f in re.split(r"[\r\n]", err) if f.strip()]
    # every frame is this one bar (three epochs and five validations drew no bar of their own), counting to 10
    assert frames and all(f.startswith("stage X:") for f in frames), frames
    assert "10/10" in frames[-1]
    assert "train/loss=" in frames[-1] and "train/other" not in err and "val/loss" not in err
