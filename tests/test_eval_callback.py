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


# --- a LatentDiffusion sampled through the one sampling path ------------------------------------------------------

COLOURS = [(-0.8, 0.6, 0.2), (0.7, -0.5, -0.7), (0.1, 0.8, -0.6), (-0.3, -0.6, 0.9)]


class ToyColours(torch.utils.data.Dataset):
    """Item i: the constant [4 x 4 x 3] image of colour ``COLOURS[i % 4]`` (in [-1, 1]) with class label i % 4."""

    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = i % len(COLOURS)
        return {"image": np.full((4, 4, 3), COLOURS[k], dtype=np.float32), "class_label": k}


def tiny_class_ldm():
    from ldm.models.diffusion.ddpm import LatentDiffusion

    return LatentDiffusion(
        unet_config={"target": "tests.test_ddpm_support.TinyCondUNet",
                     "params": {"in_channels": 3, "out_channels": 3, "hidden": 32, "context_dim": 8,
                                "timesteps": 100}},
        first_stage_config={"target": "tests.test_ddpm_support.IdentityStage", "params": {"embed_dim": 3}},
        cond_stage_config={"target": "tests.test_ddpm_support.TinyClassEmbedder", "params": {"embed_dim": 8, "n_classes": 5}},
        cond_stage_key="class_label", conditioning_key="crossattn", cond_stage_trainable=True, timesteps=100,
        image_size=4, channels=3, linear_start=0.0015, linear_end=0.0195, use_ema=True, ucg_rate=0.1, monitor=None)


def test_fid_of_a_latent_diffusion_falls_with_training_and_follows_ema_guidance_and_conditions():
    from ldm.modules.ema import LitEma

    torch.manual_seed(0)
    model = tiny_class_ldm()
    model.learning_rate = 3e-3
    untrained = tiny_class_ldm()
    untrained.load_state_dict(model.state_dict())
    ex = MeanColourExtractor()
    fid_args = dict(num_samples=32, reference=ToyColours(64), extractor=ex, sample_batch_size=16,
                    sampling={"sampler": "ddim", "steps": 25})
    cb = FIDCallback(every_n_steps=100, use_ema=False, **fid_args)
    fid_untrained = cb.compute_fid(untrained)
    loader = torch.utils.data.DataLoader(ToyColours(32 * 300), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=300, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(model, train_dataloaders=loader)
    steps, fids = zip(*cb.history)
    assert steps == (100, 200, 300)
    assert max(fids) < 0.7 * fid_untrained, (fid_untrained, fids)
    assert trainer.callback_metrics["val/fid"].item() == pytest.approx(fids[-1], rel=1e-5)
    # the same noise every evaluation: the last value again, and the training RNG left alone
    state = torch.random.get_rng_state()
    assert cb.compute_fid(model) == pytest.approx(fids[-1], rel=1e-6)
    assert torch.equal(torch.random.get_rng_state(), state)
    # guided samples (uc: the null class) follow the reference items' labels, in order
    guided = FIDCallback(every_n_steps=1, use_ema=False, guidance_scale=3.0, **fid_args)
    colours = guided._sampler(model.eval())(0, 8).mean(dim=(2, 3))
    nearest = torch.cdist(colours, torch.tensor(COLOURS)).argmin(dim=1)
    assert (nearest == torch.arange(8) % 4).sum() >= 7, nearest
    assert guided.compute_fid(model) != pytest.approx(fids[-1], rel=1e-3)
    # use_ema samples with the EMA weights: an EMA holding the untrained UNet gives the untrained UNet's FID
    model.model_ema = LitEma(untrained.model)
    untrained.cond_stage_model.load_state_dict(model.cond_stage_model.state_dict())  # the same (trained) labels
    fid_ema = FIDCallback(every_n_steps=1, use_ema=True, **fid_args).compute_fid(model)
    assert fid_ema == pytest.approx(cb.compute_fid(untrained), rel=1e-6) and fid_ema > 1.4 * fids[-1]


def test_fid_callback_samples_the_demo_text_model_with_reference_captions(repo_root):
    """The demo config's LatentDiffusion (text-conditional, MiniLM prompts, EMA) is sampled by the callback with
    the reference dataset's captions and guidance against the empty prompt."""
    from omegaconf import OmegaConf

    from ldm.data.emoji import EmojiDataset
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(repo_root / "configs" / "demo" / "ldm.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    prompts = []
    encode = model.get_learned_conditioning
    model.get_learned_conditioning = lambda c: prompts.append(list(c)) or encode(c)
    params = {"size": 32, "split": "validation", "max_classes": 2, "length": 4}
    cb = FIDCallback(every_n_steps=1, num_samples=4, extractor=MeanColourExtractor(), sample_batch_size=4,
                     reference={"target": "ldm.data.emoji.EmojiDataset", "params": params},
                     sampling={"sampler": "dpmpp_2m", "steps": 2}, guidance_scale=3.0)
    assert np.isfinite(cb.compute_fid(model))
    ds = EmojiDataset(**params)
    assert prompts == [[ds[i]["caption"] for i in range(4)], [""] * 4]
