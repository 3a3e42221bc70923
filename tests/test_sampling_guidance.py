"""Classifier-free guidance: one batched forward, uc + s (c - uc), tensors / lists / hybrid dicts."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.denoiser import SigmaDenoiser
from ldm.models.diffusion.guidance import CFGGuider, GuidanceTerm, concat_conditionings
from ldm.models.diffusion.parameterization import NoisyInput, Prediction
from ldm.models.diffusion.sigma_samplers import get_sigmas_karras, sample_dpmpp_2m

from tests.test_sampling_models import GaussianModel, TinyNetModel, single_thread  # noqa: F401


class Recorder:
    """predict(inp, cond): eps = x * t + a function of cond, x0 = eps / 2 - x; records every call's batch size."""

    def __init__(self):
        self.batches = []

    def __call__(self, inp, cond):
        self.batches.append(inp.x.shape[0])
        if isinstance(cond, dict):
            extra = cond["c_concat"][0].mean(dim=(1, 2, 3)) * 10 + cond["c_crossattn"][0].sum(dim=(1, 2))
        elif isinstance(cond, list):
            extra = sum(c.flatten(1).sum(1) for c in cond)
        else:
            extra = cond.flatten(1).sum(1)
        eps = inp.x * inp.t.float().reshape(-1, 1, 1, 1) + extra.reshape(-1, 1, 1, 1)
        return Prediction(eps / 2 - inp.x, eps)


def noisy(x, t):
    a = torch.linspace(0.9, 0.1, x.shape[0]).reshape(-1, 1, 1, 1)
    return NoisyInput(x, t, a.sqrt(), (1 - a).sqrt())


def assert_guided(out, predict, inp, c, uc, scale):
    u, k = predict(inp, uc), predict(inp, c)
    torch.testing.assert_close(out.eps, u.eps + scale * (k.eps - u.eps))
    torch.testing.assert_close(out.x0, u.x0 + scale * (k.x0 - u.x0))


def test_guidance_is_uc_plus_scale_times_difference_in_one_forward():
    predict = Recorder()
    inp = noisy(torch.randn(3, 2, 4, 4), torch.tensor([5, 9, 100]))
    c, uc = torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    out = CFGGuider(4.0, uc)(predict, inp, c)
    assert predict.batches == [6]
    assert_guided(out, predict, inp, c, uc, 4.0)


def test_scale_one_or_no_uncond_is_one_conditional_forward():
    inp, c = noisy(torch.randn(2, 1, 2, 2), torch.tensor([3, 4])), torch.randn(2, 5)
    for guider in (CFGGuider(1.0, torch.zeros(2, 5)), CFGGuider(7.0, None)):
        predict = Recorder()
        out, expected = guider(predict, inp, c), predict(inp, c)
        torch.testing.assert_close(out.eps, expected.eps)
        torch.testing.assert_close(out.x0, expected.x0)
        assert predict.batches == [2, 2]  # the guider's call, then ours
        assert not guider.requires_grad


def test_list_and_hybrid_dict_conditionings():
    inp = noisy(torch.randn(2, 1, 4, 4), torch.tensor([1, 2]))
    c_list, uc_list = [torch.randn(2, 3), torch.randn(2, 4)], [torch.zeros(2, 3), torch.zeros(2, 4)]
    predict = Recorder()
    assert_guided(CFGGuider(2.0, uc_list)(predict, inp, c_list), predict, inp, c_list, uc_list, 2.0)
    # hybrid: c_concat is shared, only c_crossattn is swapped (a negative prompt)
    cond = {"c_concat": [torch.randn(2, 1, 4, 4)], "c_crossattn": [torch.randn(2, 3, 5)]}
    neg = torch.randn(2, 3, 5)
    batched = concat_conditionings({"c_crossattn": [neg]}, cond)
    torch.testing.assert_close(batched["c_concat"][0], torch.cat([cond["c_concat"][0]] * 2))
    torch.testing.assert_close(batched["c_crossattn"][0], torch.cat([neg, cond["c_crossattn"][0]]))
    assert concat_conditionings(neg, cond)["c_crossattn"][0].shape == (4, 3, 5)
    out = CFGGuider(3.0, {"c_crossattn": [neg]})(predict, inp, cond)
    uncond = {"c_concat": cond["c_concat"], "c_crossattn": [neg]}
    assert_guided(out, predict, inp, cond, uncond, 3.0)


def test_a_guidance_term_composes_with_cfg():
    """A further term (here: a constant shift of eps, the shape classifier guidance takes) corrects the
    classifier-free-guided prediction, and x0 follows from the corrected eps."""
    class ShiftEps(GuidanceTerm):
        uses_grad = True

        def correct(self, pred, inp, cond):
            return Prediction.from_eps(pred.eps - inp.sigma * 0.5, inp)

    predict = Recorder()
    inp = noisy(torch.randn(2, 1, 2, 2), torch.tensor([3, 7]))
    c, uc = torch.randn(2, 3), torch.zeros(2, 3)
    term = ShiftEps(CFGGuider(2.5, uc))
    out = term(predict, inp, c)
    cfg = CFGGuider(2.5, uc)(predict, inp, c)
    torch.testing.assert_close(out.eps, cfg.eps - inp.sigma * 0.5)
    torch.testing.assert_close(inp.alpha * out.x0 + inp.sigma * out.eps, inp.x)  # a consistent prediction
    assert term.requires_grad and not CFGGuider().requires_grad


def test_mismatched_conditionings_are_refused_clearly():
    with pytest.raises(ValueError, match="does not match"):
        concat_conditionings(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="keys \\['c_other'\\]"):
        concat_conditionings({"c_other": [torch.zeros(1)]}, {"c_crossattn": [torch.zeros(1)]})
    with pytest.raises(ValueError, match="2 items"):
        concat_conditionings([torch.zeros(1, 1)] * 2, [torch.zeros(1, 1)])


def test_guided_gaussian_sampling_equals_sampling_the_extrapolated_mean():
    """For the exact Gaussian denoiser, guidance from mu_u to mu_c with scale s is the denoiser of
    mu_u + s (mu_c - mu_u); so guided DPM-Solver++ and DDIM land where unguided sampling of that mean does."""
    model = GaussianModel("v", s=0.5)
    x_T = torch.randn(16, 1, 2, 2, dtype=torch.float64)
    c, uc = torch.full((16,), 1.0), torch.full((16,), 0.2)
    target = torch.full((16,), 0.2 + 3.0 * (1.0 - 0.2))
    den_g, den = SigmaDenoiser(model, CFGGuider(3.0, uc)), SigmaDenoiser(model)
    sigmas = get_sigmas_karras(10, float(den.sigma_min), float(den.sigma_max))
    guided = sample_dpmpp_2m(den_g, x_T * sigmas[0], sigmas, extra_args={"cond": c}, disable=True)
    plain = sample_dpmpp_2m(den, x_T * sigmas[0], sigmas, extra_args={"cond": target}, disable=True)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    ddim_g, _ = DDIMSampler(model).sample(10, 16, (1, 2, 2), conditioning=c, x_T=x_T, verbose=False,
                                          unconditional_guidance_scale=3.0, unconditional_conditioning=uc)
    ddim, _ = DDIMSampler(model).sample(10, 16, (1, 2, 2), conditioning=target, x_T=x_T, verbose=False)
    torch.testing.assert_close(ddim_g, ddim, rtol=1e-5, atol=1e-5)
    assert (ddim.mean() - 2.6).abs() < 0.5


def test_hybrid_model_guided_ddim_matches_separate_forwards():
    net = TinyNetModel(channels=3)
    cond = {"c_concat": [torch.randn(2, 1, 4, 4)], "c_crossattn": [torch.randn(2, 1)]}
    uncond = {"c_crossattn": [torch.zeros(2, 1)]}
    full_uncond = {"c_concat": cond["c_concat"], "c_crossattn": uncond["c_crossattn"]}
    x_T = torch.randn(2, 3, 4, 4)
    got, _ = DDIMSampler(net).sample(5, 2, (3, 4, 4), conditioning=cond, x_T=x_T, verbose=False,
                                     unconditional_guidance_scale=2.0, unconditional_conditioning=uncond)

    class Separate:  # the same model, guided by two plain forwards
        def __init__(self, inner):
            self.inner = inner
            for k in ("alphas_cumprod", "alphas_cumprod_prev", "num_timesteps", "parameterization", "q_sample"):
                setattr(self, k, getattr(inner, k))

        def apply_model(self, x, t, c):
            e_u = self.inner.apply_model(x, t, full_uncond)
            return e_u + 2.0 * (self.inner.apply_model(x, t, c) - e_u)

    expected, _ = DDIMSampler(Separate(net)).sample(5, 2, (3, 4, 4), conditioning=cond, x_T=x_T, verbose=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
