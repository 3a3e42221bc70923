"""Training timestep samplers: uniform draws as before, logit-normal draws follow their distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ldm.models.diffusion.timestep_sampling import (LogitNormalTimesteps, UniformTimesteps,
                                                   make_timestep_sampler)


def test_uniform_is_bit_identical_to_the_original_draw():
    torch.manual_seed(7)
    original = torch.randint(0, 1000, (64,), device="cpu").long()
    torch.manual_seed(7)
    assert torch.equal(UniformTimesteps(1000)(64, "cpu"), original)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(UniformTimesteps(1000)(64, "cpu", generator=gen_a),
                       torch.randint(0, 1000, (64,), generator=gen_b))


def test_uniform_draws_what_the_ddpm_training_step_draws():
    from ldm.models.diffusion.ddpm import DDPM

    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 1, "out_channels": 1, "model_channels": 32,
                       "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1], "num_heads": 1}}
    model = DDPM(unet, timesteps=100, use_ema=False, image_size=8, channels=1)
    x = torch.zeros(16, 1, 8, 8)
    torch.manual_seed(11)
    expected = model.sample_timesteps(x)
    torch.manual_seed(11)
    assert torch.equal(UniformTimesteps(model.num_timesteps)(x.shape[0], x.device), expected)


def logit_normal_cdf(k: np.ndarray, T: int, mean: float, std: float) -> np.ndarray:
    """P(t <= k) for the discretised logit-normal: P(u < (k + 1) / T)."""
    u = np.clip((k + 1) / T, 1e-300, 1.0)
    with np.errstate(divide="ignore"):
        logit = np.log(u) - np.log1p(-u)
    return stats.norm.cdf((logit - mean) / std)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.0, 0.5), (-0.5, 1.5)])
def test_logit_normal_follows_its_distribution(mean, std):
    T, n = 1000, 100_000
    draws = LogitNormalTimesteps(T, mean, std)(n, "cpu", generator=torch.Generator().manual_seed(0)).numpy()
    assert draws.min() >= 0 and draws.max() <= T - 1
    k = np.arange(T)
    empirical = np.searchsorted(np.sort(draws), k, side="right") / n
    ks = np.abs(empirical - logit_normal_cdf(k, T, mean, std)).max()
    assert ks < 1.63 / np.sqrt(n)  # the 1% critical value of the Kolmogorov-Smirnov statistic
    # the median sits at T * sigmoid(mean): a positive mean favours the noisier steps
    assert abs(np.median(draws) - T / (1 + np.exp(-mean))) < 5


def test_factory_reads_the_config_and_names_bad_keys():
    assert make_timestep_sampler(None, 10) == UniformTimesteps(10)
    assert make_timestep_sampler("uniform", 10) == UniformTimesteps(10)
    assert make_timestep_sampler({"kind": "logit_normal", "std": 2.0}, 10) == LogitNormalTimesteps(10, 0.0, 2.0)
    with pytest.raises(ValueError, match="timestep_sampling.kind 'beta'"):
        make_timestep_sampler({"kind": "beta"}, 10)
    with pytest.raises(ValueError, match="sigma"):
        make_timestep_sampler({"kind": "logit_normal", "sigma": 1.0}, 10)
    with pytest.raises(ValueError, match="std"):
        LogitNormalTimesteps(10, std=0.0)
