"""Exact resume of the real models: a tiny stage one (AutoencoderKL, two optimisers) and a tiny stage two
(LatentDiffusion with scale_by_std and EMA), interrupted mid-epoch and resumed, equal uninterrupted runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from ldm.data.sampler import ItemSeededDataset, ResumableSampler
from ldm.checkpoint import load_checkpoint
from ldm.util import instantiate_from_config
from tests.test_reliability_resume import _train, assert_same_training_state

CONFIGS = Path(__file__).parent / "configs"
N_ITEMS, BATCH = 12, 4  # 3 batches per epoch


def _model_factory(config_name: str, **params):
    config = OmegaConf.load(CONFIGS / config_name).model
    config.params.update(params)

    def make():
        model = instantiate_from_config(config)
        model.learning_rate = config.base_learning_rate
        return model
    return make


def _emoji_loader() -> DataLoader:
    from ldm.data.emoji import EmojiDataset

    data = Subset(EmojiDataset(size=16, split="train", max_classes=4), range(N_ITEMS))
    # the emoji's random augmentation is seeded per item, as main.py's data module does
    return DataLoader(ItemSeededDataset(data), batch_size=BATCH, num_workers=0,
                      sampler=ResumableSampler(N_ITEMS, seed=5, item_seeds=True))


@pytest.mark.slow
@pytest.mark.parametrize("config_name,params,opt_steps_per_batch", [
    ("ldm-stage1.yaml", {"lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                                        "params": {"disc_start": 0, "kl_weight": 1.0e-6, "disc_ndf": 8,
                                                   "disc_num_layers": 1, "perceptual_weight": 0.0,
                                                   "perceptual_weights": "random"}}}, 2),
    ("ldm-stage2.yaml", {"use_ema": True}, 1),
], ids=["stage-one", "stage-two"])
def test_real_model_resumes_exactly(tmp_path, config_name, params, opt_steps_per_batch):
    make = _model_factory(config_name, **params)
    n = 4 * opt_steps_per_batch  # 4 of 8 batches: the interruption is in the middle of the second epoch
    full, full_trainer = _train(make, tmp_path / "full", 2 * n, loader_fn=_emoji_loader)
    _, part_trainer = _train(make, tmp_path / "part", 2 * n, stop_at=n, loader_fn=_emoji_loader)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert part_trainer.global_step == n and load_checkpoint(ckpt)["global_step"] == n
    resumed, resumed_trainer = _train(make, tmp_path / "part", 2 * n, ckpt=ckpt, loader_fn=_emoji_loader)
    assert resumed_trainer.global_step == 2 * n
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)
    if hasattr(full, "scale_factor"):
        assert float(resumed.scale_factor) != 1.0 and torch.equal(full.scale_factor, resumed.scale_factor)
