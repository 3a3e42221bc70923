"""The callbacks and data module of main.py, in small in-process Lightning runs."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import SequentialSampler

from ldm.callbacks import EmergencyCheckpoint, ImageLogger
from ldm.callbacks.image_logger import image_grid
from ldm.checkpoint import load_checkpoint
from ldm.data.sampler import ResumableSampler
from main import DataModuleFromConfig, WrappedDataset
from tests.helpers.toy import ToyModel

TOY_DATA = {"target": "tests.helpers.toy.ToyDataset", "params": {"size": 16}}


def _trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_image_grid_maps_minus_one_to_black_and_one_to_white():
    images = torch.cat([-torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)])
    grid = image_grid(images, nrow=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 6, 2 + 2 * 6, 3)
    assert (grid[2:6, 2:6] == 0).all() and (grid[2:6, 8:12] == 255).all()
    gray = image_grid(torch.zeros(1, 1, 4, 4))
    assert gray.shape[-1] == 3 and (gray[2:6, 2:6] == 128).all()


def test_check_frequency_powers_of_two_then_multiples():
    logger = ImageLogger(batch_frequency=8, max_images=4)
    assert [n for n in range(26) if logger.check_frequency(n)] == [1, 2, 4, 8, 16, 24]
    flat = ImageLogger(batch_frequency=8, max_images=4, increase_log_steps=False, log_first_step=True)
    assert [n for n in range(26) if flat.check_frequency(n)] == [0, 8, 16, 24]


def test_image_logger_writes_each_step_once_with_max_images(tmp_path):
    data = DataModuleFromConfig(batch_size=4, train=TOY_DATA, num_workers=0)
    logger = ImageLogger(batch_frequency=2, max_images=2, increase_log_steps=False)
    # with accumulation, on_train_batch_end sees each global step twice: it must log once
    _trainer(tmp_path, [logger], max_steps=4, accumulate_grad_batches=2).fit(ToyModel(), data)
    files = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert [f.split("_e-")[0] for f in files] == ["inputs_gs-000002", "inputs_gs-000004",
                                                 "reconstructions_gs-000002", "reconstructions_gs-000004"]
    grid = np.asarray(Image.open(tmp_path / "images" / "train" / files[0]))
    assert grid.shape == (2 + 10, 2 + 2 * 10, 3)  # max_images = 2 of the batch of 4


class _ImageTakingLogger:
    """Stands in for W&B (log_image) or TensorBoard (experiment.add_image)."""

    def __init__(self, kind: str) -> None:
        self.calls = []
        if kind == "wandb":
            self.log_image = lambda key, images, step: self.calls.append((key, images[0].shape, step))
        else:
            self.experiment = SimpleNamespace(add_image=lambda tag, img, global_step, dataformats: self.calls.append(
                (tag, img.shape, global_step)))


def test_image_grids_go_to_loggers_that_take_images():
    loggers = [_ImageTakingLogger("wandb"), _ImageTakingLogger("tensorboard"), SimpleNamespace()]
    ImageLogger(batch_frequency=1, max_images=4)._log_to_loggers(
        SimpleNamespace(loggers=loggers, global_step=7), "val", {"samples": torch.zeros(2, 3, 4, 4)})
    expected = [("val/samples", (2 + 6, 2 + 2 * 6, 3), 7)]
    assert loggers[0].calls == expected and loggers[1].calls == expected


def test_exception_checkpoints_the_last_completed_step(tmp_path):
    data = DataModuleFromConfig(batch_size=4, train=TOY_DATA, num_workers=0)
    with pytest.raises(RuntimeError, match="toy failure at step 3"):
        _trainer(tmp_path, [EmergencyCheckpoint(tmp_path / "checkpoints")], max_steps=5).fit(
            ToyModel(fail_at_step=3), data)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and "optimizer_states" in ckpt and "loops" in ckpt  # resumable


def test_no_emergency_checkpoint_before_the_first_step(tmp_path):
    callback = EmergencyCheckpoint(tmp_path / "checkpoints")
    data = DataModuleFromConfig(batch_size=4, train=TOY_DATA, num_workers=0)
    with pytest.raises(RuntimeError, match="toy failure"):
        _trainer(tmp_path, [callback], max_steps=5).fit(ToyModel(fail_at_step=0), data)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_datamodule_gives_loaders_only_for_configured_splits(tmp_path):
    data = DataModuleFromConfig(batch_size=4, train=TOY_DATA, test={**TOY_DATA, "params": {"size": 6}})
    assert data.num_workers == 8  # 2 * batch_size, as in the original
    data.num_workers = 0
    data.setup()
    assert data.val_dataloader() == [] and data.predict_dataloader() == []
    train, test = data.train_dataloader(), data.test_dataloader()
    assert isinstance(train.sampler, ResumableSampler) and isinstance(test.sampler, SequentialSampler)
    assert [b["image"].shape[0] for b in test] == [4, 2]
    assert next(iter(train))["image"].shape == (4, 3, 8, 8)
    # no validation config: Lightning runs no validation (ToyModel's validation_step would log val/loss)
    trainer = _trainer(tmp_path, [], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(ToyModel(), data)
    assert trainer.global_step == 4 and "val/loss" not in trainer.callback_metrics
    with_val = DataModuleFromConfig(batch_size=4, train=TOY_DATA, validation=TOY_DATA, num_workers=0)
    trainer = _trainer(tmp_path, [], max_steps=4, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(ToyModel(), with_val)
    assert "val/loss" in trainer.callback_metrics


def test_datamodule_wraps_and_never_shuffles_iterable_datasets():
    wrapped = DataModuleFromConfig(batch_size=2, train=TOY_DATA, wrap=True, num_workers=0)
    wrapped.setup()
    assert isinstance(wrapped.datasets["train"], WrappedDataset) and len(wrapped.datasets["train"]) == 16
    stream_cfg = {"target": "tests.helpers.toy.ToyStream", "params": {"length": 5}}
    stream = DataModuleFromConfig(batch_size=2, train=stream_cfg, num_workers=0)
    stream.setup()
    batches = [b["image"][:, 0, 0, 0].tolist() for b in stream.train_dataloader()]
    assert batches == [[0.0, 1.0], [2.0, 3.0], [4.0]]
