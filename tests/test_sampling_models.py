"""Stand-in diffusion models for the sampler tests (the attributes of the original's notebook API)."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.schedule import make_beta_schedule, schedule_buffers, sigmas_from_alphas_cumprod, t_to_sigma


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: on a shared, loaded CPU, small ops with two spinning threads run ~1000x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScheduleModel(torch.nn.Module):
    """Registers the twelve schedule buffers of an LDM 'linear' schedule of `timesteps` steps."""

    def __init__(self, parameterization: str = "eps", timesteps: int = 1000) -> None:
        super().__init__()
        for k, v in schedule_buffers(make_beta_schedule("linear", timesteps, 0.00085, 0.012)).items():
            self.register_buffer(k, v)
        self.num_timesteps = timesteps
        self.parameterization = parameterization
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.alphas_cumprod[t].reshape(-1, *([1] * (x_start.ndim - 1))).to(x_start.dtype)
        return a.sqrt() * x_start + (1 - a).sqrt() * noise

    def alpha_sigma(self, t: torch.Tensor, x: torch.Tensor):
        """(sqrt(a_t), sqrt(1 - a_t)) broadcast to x, exact at integer t, interpolated at float t."""
        if t.dtype in (torch.int64, torch.int32):
            a = self.alphas_cumprod.double()[t]
        else:
            ve = t_to_sigma(t, sigmas_from_alphas_cumprod(self.alphas_cumprod)).double()
            a = 1 / (1 + ve ** 2)
        a = a.reshape(-1, *([1] * (x.ndim - 1)))
        return a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)

    def encode_output(self, x0, eps, alpha, sigma):
        if self.parameterization == "eps":
            return eps
        if self.parameterization == "x0":
            return x0
        return alpha * eps - sigma * x0


class GaussianModel(ScheduleModel):
    """The exact denoiser for data x0 ~ N(mu, s^2 I); a Tensor conditioning replaces mu (per sample)."""

    def __init__(self, parameterization: str = "eps", mu: float = 0.3, s: float = 0.5, timesteps: int = 1000):
        super().__init__(parameterization, timesteps)
        self.mu, self.s = mu, s

    def apply_model(self, x, t, cond=None):
        self.calls += 1
        alpha, sigma = self.alpha_sigma(t, x)
        mu = self.mu if cond is None else cond.reshape(x.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)
        x0 = mu + alpha * self.s ** 2 / (alpha ** 2 * self.s ** 2 + sigma ** 2) * (x - alpha * mu)
        eps = (x - alpha * x0) / sigma
        return self.encode_output(x0, eps, alpha, sigma)

    def exact_flow(self, x_sigma, sigma_from, sigma_to, mu=None):
        """The probability-flow ODE solution in x_sigma = x_t / alpha_t space, from sigma_from to sigma_to."""
        mu = self.mu if mu is None else mu
        s2 = self.s ** 2
        return mu + (x_sigma - mu) * ((s2 + sigma_to ** 2) / (s2 + sigma_from ** 2)) ** 0.5


class TinyNetModel(ScheduleModel):
    """A fixed random conv net standing in for a UNet (eps-prediction); Tensor conditionings shift it."""

    def __init__(self, channels: int = 3, timesteps: int = 1000, seed: int = 0):
        super().__init__("eps", timesteps)
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
        self.channels = channels

    def apply_model(self, x, t, cond=None):
        self.calls += 1
        scale = (t.float() / self.num_timesteps).reshape(-1, 1, 1, 1)
        out = self.conv(x) + torch.tanh(x) * scale
        if isinstance(cond, dict):
            cond = cond["c_crossattn"][0] + cond["c_concat"][0].mean(dim=(1, 2, 3))[:, None]
        if cond is not None:
            out = out + cond.reshape(x.shape[0], -1, 1, 1)[:, :1] * 0.5
        return out


def test_gaussian_model_parameterizations_describe_one_denoiser():
    """The eps, x0 and v stand-ins encode the same posterior mean (what the sampler tests rely on)."""
    from ldm.models.diffusion.parameterization import to_x0_eps

    x = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 800, 999])
    outs = {}
    for p in ("eps", "x0", "v"):
        m = GaussianModel(p)
        alpha, sigma = m.alpha_sigma(t, x)
        outs[p] = to_x0_eps(p, m.apply_model(x, t), x, alpha, sigma)[0]
    torch.testing.assert_close(outs["x0"], outs["eps"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs["v"], outs["eps"], rtol=1e-9, atol=1e-9)
    # at t = 999 the posterior mean is close to the prior mean mu
    assert (outs["eps"][-1] - 0.3).abs().max() < 0.1
