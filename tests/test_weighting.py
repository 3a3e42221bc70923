"""Min-SNR-gamma weights: the closed forms per parameterisation and their x0-space equivalence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.parameterization import target, to_x0_eps
from ldm.models.diffusion.schedule import make_beta_schedule, rescale_zero_terminal_snr, schedule_buffers
from ldm.models.diffusion.weighting import MinSNRWeighting, UnitWeighting, make_loss_weighting, min_snr_weights, snr

PARAMS = ("eps", "x0", "v")


def ldm_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_buffers(betas)["alphas_cumprod"]


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_weights_equal_their_formula(gamma):
    ac = ldm_alphas_cumprod()
    a = ac.double().numpy()
    s = a / (1 - a)
    expected = {"eps": np.minimum(s, gamma) / s, "x0": np.minimum(s, gamma), "v": np.minimum(s, gamma) / (s + 1)}
    for p in PARAMS:
        np.testing.assert_allclose(min_snr_weights(ac, p, gamma).numpy(), expected[p], rtol=1e-6)
    # the cap is active at the clean end (SNR > gamma) and inactive at the noisy end
    eps = min_snr_weights(ac, "eps", gamma)
    assert eps[0] < 0.1 and eps[-1] == 1.0


def test_weighted_loss_is_the_same_x0_space_loss_in_every_parameterisation():
    gen = torch.Generator().manual_seed(0)
    ac = ldm_alphas_cumprod()
    gamma = 5.0
    t = torch.tensor([0, 3, 50, 200, 500, 999])
    shape = (len(t), 4, 8, 8)
    x0, eps, x0_hat = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    alpha = ac.double()[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - ac.double()[t]).sqrt().view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    eps_hat = (x_t - alpha * x0_hat) / sigma
    outputs = {"eps": eps_hat, "x0": x0_hat, "v": alpha * eps_hat - sigma * x0_hat}
    x0_space = torch.clamp(snr(ac)[t], max=gamma) * ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    for p in PARAMS:
        # the output really is the same prediction, seen through this parameterisation
        torch.testing.assert_close(to_x0_eps(p, outputs[p], x_t, alpha, sigma)[0], x0_hat)
        w = min_snr_weights(ac, p, gamma).double()[t]
        weighted = w * ((outputs[p] - target(p, x0, eps, alpha, sigma)) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(weighted, x0_space, rtol=1e-5, atol=0.0)


def test_zero_terminal_snr_gives_finite_weights_with_the_right_limits():
    ac = ldm_alphas_cumprod(zero_terminal_snr=True)
    assert ac[-1] < 1e-12
    w = {p: min_snr_weights(ac, p, 5.0) for p in PARAMS}
    assert all(torch.isfinite(v).all() for v in w.values())
    assert w["eps"][-1] == 1.0 and w["v"][-1] == 0.0 and w["x0"][-1] == 0.0


def test_lookup_by_timestep_and_bad_gamma():
    ac = ldm_alphas_cumprod()
    weighting = MinSNRWeighting(gamma=2.0)
    t = torch.tensor([999, 0, 10, 10])
    torch.testing.assert_close(weighting(t, ac, "v"), min_snr_weights(ac, "v", 2.0)[t])
    assert weighting(t, ac, "v").dtype == torch.float32
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(ac, "eps", 0.0)
    with pytest.raises(ValueError, match="gamma"):
        MinSNRWeighting(-1.0)
    with pytest.raises(ValueError, match="parameterization"):
        weighting(t, ac, "score")


def test_factory_reads_the_config_and_names_bad_keys():
    ac = ldm_alphas_cumprod()
    t = torch.arange(1000)
    for config in (None, "none"):
        assert isinstance(make_loss_weighting(config), UnitWeighting)
        assert torch.equal(make_loss_weighting(config)(t, ac, "eps"), torch.ones(1000))
    weighting = make_loss_weighting({"kind": "min_snr", "gamma": 2.0})
    torch.testing.assert_close(weighting(t, ac, "x0"), min_snr_weights(ac, "x0", 2.0))
    with pytest.raises(ValueError, match="loss_weighting.kind 'p2'"):
        make_loss_weighting({"kind": "p2"})
    with pytest.raises(ValueError, match="unknown loss_weighting key\\(s\\) k"):
        make_loss_weighting({"kind": "min_snr", "k": 1.0})
