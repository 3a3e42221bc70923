"""configs/autoencoder/*: the zoo's model values, resolvable data targets, and a real (tiny) run through main.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint
from ldm.util import get_obj_from_str
from tests.helpers.paths import REFERENCE_CONFIGS

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "autoencoder"
ZOO = REFERENCE_CONFIGS / "latent-diffusion" / "models" / "first_stage_models"
NAMES = ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_zoo_model_has_a_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(NAMES)
    assert sorted(p.name for p in ZOO.iterdir()) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_has_the_zoo_model_values(name):
    ours = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    zoo = OmegaConf.to_container(OmegaConf.load(ZOO / name / "config.yaml"))
    ours_loss, zoo_loss = ours["model"]["params"].pop("lossconfig"), zoo["model"]["params"].pop("lossconfig")
    assert ours["model"] == zoo["model"]
    # the loss: the same class (the zoo names taming's path for the VQ loss) and the same values
    assert get_obj_from_str(ours_loss["target"]) is get_obj_from_str(zoo_loss["target"])
    extra = set(ours_loss["params"]) - set(zoo_loss["params"])
    assert extra <= {"n_classes"}  # VQ configs also log the codebook perplexity
    assert {k: ours_loss["params"][k] for k in zoo_loss["params"]} == zoo_loss["params"]
    if "n_classes" in extra:
        assert ours_loss["params"]["n_classes"] == ours["model"]["params"]["n_embed"]
    # data and logging targets resolve; manual optimisation cannot accumulate gradients in Lightning
    for split in ("train", "validation"):
        get_obj_from_str(ours["data"]["params"][split]["target"])
    assert ours["lightning"]["callbacks"]["image_logger"]["target"] == "main.ImageLogger"
    assert "accumulate_grad_batches" not in ours["lightning"].get("trainer", {})


@pytest.mark.slow
def test_kl_config_trains_with_main_py(tmp_path):
    from ldm.train import main

    torch.manual_seed(0)
    tiny = ["model.params.ddconfig.ch=32", "model.params.ddconfig.ch_mult=[1,2,2,2]",
            "model.params.ddconfig.num_res_blocks=1", "model.params.ddconfig.resolution=32",
            "model.params.lossconfig.params.perceptual_weights=random",
            "model.params.lossconfig.params.disc_start=1", "model.params.lossconfig.params.disc_num_layers=1",
            "model.params.lossconfig.params.disc_ndf=8",
            "lightning.trainer.max_steps=4", "lightning.trainer.enable_progress_bar=false",
            "lightning.trainer.enable_model_summary=false", "lightning.trainer.num_sanity_val_steps=0",
            "lightning.trainer.benchmark=false", "lightning.trainer.limit_val_batches=1",
            "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.max_images=2",
            "lightning.callbacks.image_logger.params.increase_log_steps=false"]
    # ImageNet is not here: the same config with the emoji dataset in its data section
    cfg = OmegaConf.load(CONFIGS / "kl-f8.yaml")
    emoji = {"target": "ldm.data.emoji.EmojiDataset", "params": {"size": 32, "max_classes": 2}}
    cfg.data.params = {"batch_size": 2, "num_workers": 0,
                       "train": OmegaConf.merge(emoji, {"params": {"split": "train", "length": 4}}),
                       "validation": OmegaConf.merge(emoji, {"params": {"split": "validation", "length": 2}})}
    OmegaConf.save(cfg, tmp_path / "kl-f8.yaml")
    logs = tmp_path / "logs"
    main(["--base", str(tmp_path / "kl-f8.yaml"), "-t", "-l", str(logs), *tiny])
    (logdir,) = [d for d in logs.iterdir() if d.is_dir()]
    ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 2  # 2 batches, 2 optimisers each
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1) and "loss.discriminator.main.0.weight" in sd
    images = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstructions", "samples"} <= images, images
