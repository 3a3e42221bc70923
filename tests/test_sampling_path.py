"""The one sampling path: inference mode, gradient-taking guidance terms in every sampler, precision."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import CFGGuider, GuidanceTerm
from ldm.models.diffusion.parameterization import Prediction
from ldm.models.diffusion.sampling import SAMPLERS, SamplerKind, SamplingOptions, autocast, sample

from tests.test_sampling_models import GaussianModel, single_thread  # noqa: F401


class TowardsTarget(GuidanceTerm):
    """Classifier-style guidance with log p(y | x_t) = -|x_t - target|^2 / 2, through autograd:
    eps <- eps - sigma * scale * grad (the form classifier guidance takes, Dhariwal & Nichol 2021)."""

    uses_grad = True

    def __init__(self, target: float, scale: float, inner=None):
        super().__init__(inner)
        self.target, self.scale = target, scale

    def correct(self, pred, inp, cond):
        with torch.enable_grad():
            x = inp.x.detach().requires_grad_()
            log_p = -0.5 * ((x - self.target) ** 2).sum()
            (grad,) = torch.autograd.grad(log_p, x)
        return Prediction.from_eps(pred.eps - inp.sigma * self.scale * grad, inp)


def test_samples_are_inference_tensors_and_cpu_precision_is_full():
    model = GaussianModel("eps")
    x_T = torch.randn(4, 1, 2, 2)
    full = sample(model, x_T.shape, options=SamplingOptions(steps=5), x_T=x_T).samples
    assert full.is_inference() and not full.requires_grad
    for precision in ("bf16", "autocast"):  # autocast applies on accelerators only: CPU results are identical
        same = sample(model, x_T.shape, options=SamplingOptions(steps=5, precision=precision), x_T=x_T).samples
        assert same.dtype == torch.float32 and torch.equal(same, full)
    out, _ = DDIMSampler(model, precision="bf16").sample(5, 4, (1, 2, 2), x_T=x_T, verbose=False)
    assert out.is_inference() and torch.equal(out, full)


def test_autocast_picks_the_precision_on_accelerators_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not isinstance(autocast(cpu, "bf16"), torch.autocast)
    assert not isinstance(autocast(gpu, "full"), torch.autocast)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nothing():
        bf16, fp16 = autocast(gpu, "bf16"), autocast(gpu, "autocast")
    assert bf16.fast_dtype == torch.bfloat16 and fp16.fast_dtype == torch.float16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast(gpu, "fp8")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("sampler", [k.value for k in SamplerKind])
def test_a_gradient_guidance_term_composes_with_cfg_in_every_sampler(sampler):
    """A guidance term that takes gradients works in every sampler (the path leaves inference mode for it) and
    composes with classifier-free guidance: the samples move towards its target."""
    model = GaussianModel("eps", mu=0.0, s=0.5)
    torch.manual_seed(0)
    x_T = torch.randn(256, 1)
    c, uc = torch.full((256,), 0.2), torch.full((256,), 0.0)
    steps = 1000 if sampler == "ddpm" else 20
    options = SamplingOptions(sampler=sampler, steps=steps)
    torch.manual_seed(1)
    cfg = sample(model, x_T.shape, c, guider=CFGGuider(2.0, uc), options=options, x_T=x_T).samples
    torch.manual_seed(1)
    term = TowardsTarget(target=3.0, scale=1.0, inner=CFGGuider(2.0, uc))
    guided = sample(model, x_T.shape, c, guider=term, options=options, x_T=x_T).samples
    assert abs(cfg.mean().item() - 0.4) < 0.1  # uc + 2 (c - uc) = 0.4
    assert cfg.mean().item() + 0.3 < guided.mean().item() < 3.0
    assert not guided.is_inference()
    assert set(SAMPLERS) == set(SamplerKind)
