"""Sigma-space solvers (Euler, Heun, DPM-Solver++(2M), Euler ancestral) on the analytic Gaussian problem."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.denoiser import Denoiser, SigmaDenoiser
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.discrete import sample_ddpm
from ldm.models.diffusion.sigma_samplers import (
    get_sigmas_from_model, get_sigmas_karras, sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun,
)
from ldm.models.diffusion.timesteps import full_schedule

from tests.test_sampling_models import GaussianModel, single_thread  # noqa: F401

SOLVERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


def model_sigmas(model):
    return ((1 - model.alphas_cumprod.double()) / model.alphas_cumprod.double()).sqrt()


def test_karras_sigmas():
    sigmas = get_sigmas_karras(10, 0.03, 14.6, rho=7.0)
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[[0, 9]], torch.tensor([14.6, 0.03]))
    assert (sigmas[:-1].diff() < 0).all()
    # eq. 5 of Karras et al.: sigma_i^(1/rho) is linear in i
    torch.testing.assert_close(sigmas[:-1].double().pow(1 / 7).diff(), 
                               torch.full((9,), (0.03 ** (1 / 7) - 14.6 ** (1 / 7)) / 9, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_sigmas_from_model_are_the_discrete_levels():
    model = GaussianModel()
    den = SigmaDenoiser(model)
    sigmas = get_sigmas_from_model(den, 4)  # t = 999, 666, 333, 0
    torch.testing.assert_close(sigmas[:-1].double(), model_sigmas(model)[[999, 666, 333, 0]], rtol=1e-5, atol=0)
    assert sigmas[-1] == 0
    t = den.sigma_to_t(sigmas[:-1])
    torch.testing.assert_close(t, torch.tensor([999.0, 666.0, 333.0, 0.0]), rtol=0, atol=1e-3)


def test_ddim_is_euler_in_sigma_space():
    """Karras et al. 2022: deterministic DDIM of an eps model is Euler on x_sigma = x_t / alpha_t."""
    model = GaussianModel("eps", mu=0.3, s=0.2)
    x_T = torch.randn(64, 1, dtype=torch.float64)
    ddim, _ = DDIMSampler(model).sample(20, 64, (1,), x_T=x_T, verbose=False)
    sampler = DDIMSampler(model)
    sampler.make_schedule(20, verbose=False)
    ts = torch.as_tensor(sampler.ddim_timesteps).flip(0)
    sig = model_sigmas(model)
    sigmas = torch.cat([sig[ts], sig[:1]]).float()
    a_T, a_0 = model.alphas_cumprod.double()[ts[0]], model.alphas_cumprod.double()[0]
    euler = sample_euler(SigmaDenoiser(model), x_T / a_T.sqrt(), sigmas, disable=True)
    torch.testing.assert_close(ddim / a_0.sqrt(), euler, rtol=1e-4, atol=1e-4)


def flow_error(model, solver, steps, x_T, karras=False):
    """Max error against the exact flow from sigma_max to sigma_min (without the final denoising to 0, which
    is first order for every solver)."""
    den = SigmaDenoiser(model)
    sigmas = (get_sigmas_karras(steps, float(den.sigma_min), float(den.sigma_max)) if karras
              else get_sigmas_from_model(den, steps))[:-1]
    x = x_T * sigmas[0].double()
    out = solver(den, x, sigmas, disable=True)
    return (out - model.exact_flow(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item()


def test_dpmpp_2m_20_steps_beats_ddim_20_steps_on_the_exact_flow():
    model = GaussianModel("eps", mu=0.3, s=0.2)
    torch.manual_seed(0)
    x_T = torch.randn(256, 1, dtype=torch.float64)
    err_dpm = flow_error(model, sample_dpmpp_2m, 21, x_T, karras=True)  # 20 steps from sigma_max to sigma_min
    # DDIM 20 steps, compared with the exact flow from its own first to its own last noise level
    ddim, _ = DDIMSampler(model).sample(20, 256, (1,), x_T=x_T, verbose=False)
    sampler = DDIMSampler(model)
    sampler.make_schedule(20, verbose=False)
    ac, sig = model.alphas_cumprod.double(), model_sigmas(model)
    t_max = int(sampler.ddim_timesteps[-1])
    exact = model.exact_flow(x_T / ac[t_max].sqrt(), float(sig[t_max]), float(sig[0]))
    err_ddim = (ddim / ac[0].sqrt() - exact).abs().max().item()
    assert err_dpm < err_ddim / 3, (err_dpm, err_ddim)
    # and against a 1000-step ancestral DDPM reference: the same mean and spread
    torch.manual_seed(1)
    ddpm = sample_ddpm(Denoiser(model), torch.randn(20000, 1),
                       full_schedule(model.alphas_cumprod, model.alphas_cumprod_prev), disable=True)
    den = SigmaDenoiser(model)
    sigmas = get_sigmas_karras(20, float(den.sigma_min), float(den.sigma_max))
    dpm = sample_dpmpp_2m(den, torch.randn(20000, 1) * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True)
    assert abs(dpm.mean() - ddpm.mean()) < 0.01 and abs(dpm.std() - ddpm.std()) < 0.015


def test_second_order_solvers_converge_faster_than_euler():
    model = GaussianModel("eps", mu=0.3, s=0.2)
    torch.manual_seed(0)
    x_T = torch.randn(128, 1, dtype=torch.float64)
    err = {name: flow_error(model, fn, 21, x_T, karras=True) for name, fn in SOLVERS.items()}
    assert err["heun"] < err["euler"] / 3 and err["dpmpp_2m"] < err["euler"] / 3, err
    # second order: four times the steps, about a sixteenth of the error
    assert flow_error(model, sample_dpmpp_2m, 81, x_T, karras=True) < err["dpmpp_2m"] / 8
    assert flow_error(model, sample_heun, 81, x_T, karras=True) < err["heun"] / 8


def _sample_all(model, x_T, seed=0):
    den, disc = SigmaDenoiser(model), Denoiser(model)
    sigmas = get_sigmas_karras(12, float(den.sigma_min), float(den.sigma_max))
    out = {name: fn(den, x_T * sigmas[0], sigmas, disable=True) for name, fn in SOLVERS.items()}
    torch.manual_seed(seed)
    out["euler_a"] = sample_euler_ancestral(den, x_T * sigmas[0], sigmas, disable=True)
    out["ddim"] = DDIMSampler(model).sample(15, x_T.shape[0], x_T.shape[1:], x_T=x_T, verbose=False)[0]
    out["plms"] = PLMSSampler(model).sample(15, x_T.shape[0], x_T.shape[1:], x_T=x_T, verbose=False)[0]
    torch.manual_seed(seed)
    out["ddpm"] = sample_ddpm(disc, x_T, full_schedule(model.alphas_cumprod, model.alphas_cumprod_prev)[:100],
                              disable=True)
    return out


def test_eps_x0_v_models_give_the_same_samples():
    x_T = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    ref = _sample_all(GaussianModel("eps"), x_T)
    for p in ("x0", "v"):
        got = _sample_all(GaussianModel(p), x_T)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4, msg=f"{p} {name}")


def test_solvers_keep_dtype_and_report_progress():
    model = GaussianModel("v")
    den = SigmaDenoiser(model)
    sigmas = get_sigmas_karras(5, float(den.sigma_min), float(den.sigma_max))
    for dtype in (torch.float32, torch.bfloat16):
        for name, fn in {**SOLVERS, "euler_a": sample_euler_ancestral}.items():
            seen = []
            out = fn(den, torch.randn(2, 1, 4, 4, dtype=dtype) * sigmas[0], sigmas, disable=True,
                     callback=lambda d: seen.append(d["i"]))
            assert out.dtype == dtype and out.shape == (2, 1, 4, 4), name
            assert seen == list(range(5)), name
            assert torch.isfinite(out).all(), name


def test_sample_dispatches_to_the_named_sampler():
    from ldm.models.diffusion.sampling import SamplingOptions, sample

    model = GaussianModel("x0")
    x_T = torch.randn(4, 1, 2, 2)
    den = SigmaDenoiser(model)
    for schedule, sigmas in (("karras", get_sigmas_karras(6, float(den.sigma_min), float(den.sigma_max))),
                             ("discrete", get_sigmas_from_model(den, 6))):
        options = SamplingOptions(sampler="heun", steps=6, sigma_schedule=schedule)
        got = sample(model, x_T.shape, options=options, x_T=x_T).samples
        expected = sample_heun(den, x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True)
        torch.testing.assert_close(got, expected)
    ddim = sample(model, x_T.shape, options=SamplingOptions(sampler="ddim", steps=6), x_T=x_T).samples
    torch.testing.assert_close(ddim, DDIMSampler(model).sample(6, 4, (1, 2, 2), x_T=x_T, verbose=False)[0])
    with pytest.raises(ValueError, match="unknown sampler 'ddpmm'"):
        SamplingOptions(sampler="ddpmm")
