"""DDIM / PLMS / DDPM against the original algorithms, written out here from the papers' update rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.timesteps import make_ddim_timesteps

from tests.test_sampling_models import GaussianModel, TinyNetModel, single_thread  # noqa: F401


# ---------------------------------------------------------------------------------------------------------
# Independent reimplementations of the original code's formulas (no project helper is called here).

def original_timesteps(T, S):
    return np.asarray(list(range(0, T, T // S))) + 1


def guided_eps(model, x, t, c, uc, scale):
    if uc is None or scale == 1.0:
        return model.apply_model(x, t, c)
    e_uc = model.apply_model(x, t, uc)
    e_c = model.apply_model(x, t, c)
    return e_uc + scale * (e_c - e_uc)


def original_tables(model, S, eta, original_steps=False):
    ac = model.alphas_cumprod
    if original_steps:
        ts = np.arange(model.num_timesteps)
        alphas, alphas_prev = ac, model.alphas_cumprod_prev
    else:
        ts = original_timesteps(model.num_timesteps, S)
        alphas = ac[ts]
        alphas_prev = torch.tensor([ac[0].item()] + ac[ts[:-1]].tolist())
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    return ts, alphas, alphas_prev, sigmas


def original_step(x, e_t, a_t, a_prev, sigma_t):
    pred_x0 = (x - torch.sqrt(1 - a_t) * e_t) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
    noise = sigma_t * torch.randn(x.shape)
    return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0


def original_ddim(model, x, S, eta, c=None, uc=None, scale=1.0, original_steps=False):
    ts, alphas, alphas_prev, sigmas = original_tables(model, S, eta, original_steps)
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        t = torch.full((x.shape[0],), int(step), dtype=torch.long)
        e_t = guided_eps(model, x, t, c, uc, scale)
        x, _ = original_step(x, e_t, alphas[index], alphas_prev[index], sigmas[index])
    return x


def original_plms(model, x, S, c=None, uc=None, scale=1.0):
    ts, alphas, alphas_prev, sigmas = original_tables(model, S, 0.0)
    time_range = np.flip(ts)
    old_eps = []
    for i, step in enumerate(time_range):
        index = len(ts) - i - 1
        t = torch.full((x.shape[0],), int(step), dtype=torch.long)
        t_next = torch.full((x.shape[0],), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
        coef = (alphas[index], alphas_prev[index], sigmas[index])
        e_t = guided_eps(model, x, t, c, uc, scale)
        if len(old_eps) == 0:
            x_prev, _ = original_step(x, e_t, *coef)
            e_prime = (e_t + guided_eps(model, x_prev, t_next, c, uc, scale)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, _ = original_step(x, e_prime, *coef)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


# ---------------------------------------------------------------------------------------------------------

def test_ddim_timesteps_are_the_originals():
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 50, 1000), np.arange(0, 1000, 20) + 1)
    assert len(make_ddim_timesteps("uniform", 30, 1000)) == 31  # 1000 // 30 = 33 -> 31 steps, as the original
    np.testing.assert_array_equal(make_ddim_timesteps("quad", 10, 1000),
                                  (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1)
    with pytest.raises(ValueError, match="ddim_discretize 'cubic'"):
        make_ddim_timesteps("cubic", 10, 1000)
    with pytest.raises(ValueError, match="sampling steps"):
        make_ddim_timesteps("uniform", 2000, 1000)
    # the original's range(0, 1000, 333) + 1 ends at 1000, past the schedule: that step is dropped
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 3, 1000), [1, 334, 667])
    assert make_ddim_timesteps("uniform", 333, 1000)[-1] == 997


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNetModel(channels=3, timesteps=1000)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_reproduces_original_step_for_step(net, eta):
    x_T = torch.randn(2, 3, 6, 6)
    c, uc = torch.tensor([0.5, -1.0]), torch.zeros(2)
    for scale in (1.0, 3.0):
        torch.manual_seed(1)
        expected = original_ddim(net, x_T.clone(), 20, eta, c, uc, scale)
        torch.manual_seed(1)
        got, inter = DDIMSampler(net).sample(20, 2, (3, 6, 6), conditioning=c, eta=eta, x_T=x_T.clone(),
                                             verbose=False, unconditional_guidance_scale=scale,
                                             unconditional_conditioning=uc)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, original_ddim(net, x_T.clone(), 20, eta, c, uc, 1.0), atol=1e-3)


def test_ddim_original_steps_path_works_and_matches(net):
    net = TinyNetModel(channels=3, timesteps=40)
    x_T = torch.randn(2, 3, 4, 4)
    expected = original_ddim(net, x_T.clone(), None, 0.0, original_steps=True)
    sampler = DDIMSampler(net)
    sampler.make_schedule(10, verbose=False)
    got, _ = sampler.ddim_sampling(None, (2, 3, 4, 4), x_T=x_T.clone(), ddim_use_original_steps=True,
                                   verbose=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plms_reproduces_original_step_for_step(net):
    x_T = torch.randn(2, 3, 6, 6)
    c, uc = torch.tensor([0.5, -1.0]), torch.zeros(2)
    torch.manual_seed(1)
    expected = original_plms(net, x_T.clone(), 25, c, uc, 4.0)
    net.calls = 0
    torch.manual_seed(1)
    got, _ = PLMSSampler(net).sample(25, 2, (3, 6, 6), conditioning=c, x_T=x_T.clone(), verbose=False,
                                     unconditional_guidance_scale=4.0, unconditional_conditioning=uc)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert net.calls == 25 + 1  # one batched (cond + uncond) forward per step, plus the warm-up's extra one


def test_plms_refuses_eta(net):
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(net).sample(10, 1, (3, 4, 4), eta=0.5, verbose=False)


def test_ddim_callbacks_and_intermediates(net):
    seen, preds = [], []
    _, inter = DDIMSampler(net).sample(10, 1, (3, 4, 4), callback=seen.append, verbose=False,
                                       img_callback=lambda x0, i: preds.append((i, x0.shape)), log_every_t=4)
    assert seen == list(range(10))
    assert preds == [(i, (1, 3, 4, 4)) for i in range(10)]
    # x_T, then indices 9 (the first step), 8, 4, 0
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + 4


def test_ddim_buffers_follow_the_model_device_and_dtype(net):
    sampler = DDIMSampler(net)
    sampler.make_schedule(10, verbose=False)
    assert sampler.ddim_alphas.device == net.device and sampler.ddim_sigmas.dtype == torch.float32
    gaussian = GaussianModel("v")
    for dtype in (torch.float64, torch.bfloat16):
        x_T = torch.randn(1, 3, 4, 4, dtype=dtype)
        out, _ = DDIMSampler(gaussian).sample(10, 1, (3, 4, 4), x_T=x_T, verbose=False, eta=1.0)
        assert out.dtype == dtype and out.device == x_T.device


def test_ddim_eta_one_is_ancestral_ddpm_step_for_step():
    """With all T steps and eta = 1, each DDIM step has the DDPM posterior's mean and variance."""
    from ldm.models.diffusion.denoiser import Denoiser
    from ldm.models.diffusion.discrete import sample_ddpm
    from ldm.models.diffusion.timesteps import full_schedule

    model = TinyNetModel(channels=3, timesteps=50)
    x_T = torch.randn(3, 3, 4, 4)
    torch.manual_seed(2)
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=1.0, verbose=False)
    ddim, _ = sampler.ddim_sampling(None, x_T.shape, x_T=x_T.clone(), ddim_use_original_steps=True, verbose=False)
    torch.manual_seed(2)
    ddpm = sample_ddpm(Denoiser(model), x_T.clone(),
                       full_schedule(model.alphas_cumprod, model.alphas_cumprod_prev), disable=True)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)
    # the per-step DDIM variance is the posterior variance buffer of the original DDPM
    torch.testing.assert_close(sampler.ddim_sigmas_for_original_num_steps ** 2, model.posterior_variance,
                               rtol=1e-4, atol=1e-9)


def test_ddim_eta_one_matches_ddpm_in_distribution():
    """On Gaussian data N(mu, s^2), ancestral DDPM and all-step eta=1 DDIM (other noise) recover mu and s."""
    from ldm.models.diffusion.denoiser import Denoiser
    from ldm.models.diffusion.discrete import sample_ddpm
    from ldm.models.diffusion.timesteps import full_schedule

    model = GaussianModel("eps", mu=0.3, s=0.5)
    torch.manual_seed(3)
    n = 20000
    ddpm = sample_ddpm(Denoiser(model), torch.randn(n, 1),
                       full_schedule(model.alphas_cumprod, model.alphas_cumprod_prev), disable=True)
    sampler = DDIMSampler(model)
    sampler.make_schedule(50, ddim_eta=1.0, verbose=False)
    ddim, _ = sampler.ddim_sampling(None, (n, 1), ddim_use_original_steps=True, verbose=False)
    for samples in (ddpm, ddim):
        assert abs(samples.mean().item() - 0.3) < 0.02
        assert abs(samples.std().item() - 0.5) < 0.015
    assert not torch.allclose(ddpm, ddim)


def test_mask_blending_keeps_the_known_region():
    model = GaussianModel("eps", mu=0.0, s=1.0)
    x0 = torch.full((2, 1, 8, 8), 2.5)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    torch.manual_seed(4)
    out, _ = DDIMSampler(model).sample(20, 2, (1, 8, 8), mask=mask, x0=x0, verbose=False)
    known, unknown = out[..., :4], out[..., 4:]
    assert (known - 2.5).abs().max() < 0.1
    assert (unknown - 2.5).abs().mean() > 1.0
    with pytest.raises(ValueError, match="mask needs x0"):
        DDIMSampler(model).sample(5, 2, (1, 8, 8), mask=mask, verbose=False)


def test_stochastic_encode_then_decode_equals_sampling_from_there(net):
    sampler = DDIMSampler(net)
    sampler.make_schedule(10, verbose=False)
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    t_enc = 6
    z = sampler.stochastic_encode(x0, torch.full((2,), t_enc - 1), noise=noise)
    a = net.alphas_cumprod[sampler.ddim_timesteps[t_enc - 1]]
    torch.testing.assert_close(z, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    decoded = sampler.decode(z, None, t_enc, verbose=False)
    full, _ = sampler.ddim_sampling(None, z.shape, x_T=z, timesteps=None, verbose=False)
    ts, alphas, alphas_prev, sigmas = original_tables(net, 10, 0.0)
    x = z
    for index in reversed(range(t_enc)):
        t = torch.full((2,), int(ts[index]), dtype=torch.long)
        x, _ = original_step(x, net.apply_model(x, t, None), alphas[index], alphas_prev[index], sigmas[index])
    torch.testing.assert_close(decoded, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(decoded, full, atol=1e-3)


def test_score_corrector_and_quantized_x0(net):
    class ZeroScore:
        def modify_score(self, model, e_t, x, t, c, **kwargs):
            assert kwargs == {"k": 1}
            return torch.zeros_like(e_t)

    x_T = torch.randn(1, 3, 4, 4)
    sampler = DDIMSampler(net)
    out, _ = sampler.sample(10, 1, (3, 4, 4), x_T=x_T, score_corrector=ZeroScore(), corrector_kwargs={"k": 1},
                            verbose=False)
    # with eps = 0 every DDIM step scales x by sqrt(a_prev / a_t): the product telescopes
    a = net.alphas_cumprod
    torch.testing.assert_close(out, x_T * (a[0] / a[int(sampler.ddim_timesteps[-1])]).sqrt(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eps-prediction"):
        DDIMSampler(GaussianModel("v")).sample(5, 1, (1,), score_corrector=ZeroScore(), verbose=False)

    class Rounder(torch.nn.Module):
        def quantize(self, z):
            return z.round(), None, None

    net.first_stage_model = Rounder()
    preds = []
    DDIMSampler(net).sample(5, 1, (3, 4, 4), x_T=x_T, quantize_x0=True, verbose=False,
                            img_callback=lambda x0, i: preds.append(x0))
    assert len(preds) == 5 and all(torch.equal(p, p.round()) for p in preds)
