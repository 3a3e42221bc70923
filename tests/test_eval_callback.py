"""FIDCallback on a tiny LightningModule with an injected fake extractor."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from ldm.evaluation import FeatureExtractor, InceptionOutput, compute_fid
from ldm.evaluation.callback import FIDCallback

REF = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 3), dtype=np.uint8)


class MeanColourExtractor(FeatureExtractor):
    name = "mean-colour (test)"

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = images.float() / 255.0
        return InceptionOutput(features=torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))


class DarkeningModule(pl.LightningModule):
    """Its samples are reference images darkened by a factor that grows with each optimiser step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.modes_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        return ((self.w - batch) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(16, 1), batch_size=2)

    def sample_images(self, n: int) -> torch.Tensor:
        self.modes_seen.append(self.training)
        idx = (np.arange(n) + self.calls) % len(REF)
        self.calls += n
        x = torch.from_numpy(REF[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return (x + 1.0) * (1.0 - 0.1 * self.global_step) - 1.0


def _trainer(callback, steps):
    return pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


def test_fid_callback_logs_at_every_n_steps_and_tracks_the_samples(tmp_path):
    ex = MeanColourExtractor()
    cb = FIDCallback(every_n_steps=2, num_samples=32, reference=REF, extractor=ex, sample_batch_size=10,
                     cache_dir=str(tmp_path))
    module = DarkeningModule()
    trainer = _trainer(cb, 6)
    trainer.fit(module)
    assert [s for s, _ in cb.history] == [2, 4, 6]
    assert module.calls == 3 * 32 and module.modes_seen and not any(module.modes_seen)  # sampled in eval mode
    fids = [v for _, v in cb.history]
    assert fids[0] < fids[1] < fids[2]  # darker and darker samples
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(fids[-1], rel=1e-5)
    # The logged value is the FID of the same samples computed directly.
    direct = compute_fid(np.floor(REF[32:64].astype(np.float64) * (1.0 - 0.1 * 4) + 0.5).astype(np.uint8), REF,
                         extractor=ex)
    assert fids[1] == pytest.approx(float(direct), rel=1e-3)


def test_fid_callback_uses_sample_fn_and_errors_clearly_without_a_sampler():
    class NoSampler(DarkeningModule):
        sample_images = None

    ex = MeanColourExtractor()
    got = []

    def sample_fn(pl_module, n):
        got.append(n)
        return REF[:n]  # uint8 NHWC: identical to the reference

    cb = FIDCallback(every_n_steps=3, num_samples=64, reference=REF, extractor=ex, sample_fn=sample_fn,
                     sample_batch_size=64)
    _trainer(cb, 3).fit(NoSampler())
    assert got == [64] and cb.history[0][0] == 3 and abs(cb.history[0][1]) < 1e-9
    with pytest.raises(AttributeError, match="sample_fn"):
        FIDCallback(every_n_steps=1, num_samples=4, reference=REF, extractor=ex).compute_fid(NoSampler())
    with pytest.raises(ValueError, match="every_n_steps"):
        FIDCallback(every_n_steps=0, num_samples=4, reference=REF, extractor=ex)


def test_fid_callback_reference_from_a_dataset_config_and_a_dataset():
    from ldm.data.emoji import EmojiDataset
    from ldm.evaluation.images import images_from_dataset

    params = {"size": 16, "split": "validation", "max_classes": 2, "length": 6}
    cb = FIDCallback(every_n_steps=1, num_samples=4, extractor=MeanColourExtractor(), num_reference=5,
                     reference={"target": "ldm.data.emoji.EmojiDataset", "params": params})
    ds = EmojiDataset(**params)
    assert cb.reference.shape == (5, 16, 16, 3) and cb.reference.dtype == np.uint8
    expected = np.floor((np.stack([ds[i]["image"] for i in range(5)]) + 1) * 127.5 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(cb.reference, expected)
    np.testing.assert_array_equal(images_from_dataset(ds, limit=5), expected)
    with pytest.raises(KeyError, match="'jpg'"):
        images_from_dataset(ds, key="jpg")
