"""The one denoiser view of a diffusion model, for every sampler.

:class:`Denoiser` is the model at DDPM timesteps (DDPM, DDIM, PLMS): ``(x_t, t, cond) -> Prediction(x0, eps)``.
:class:`SigmaDenoiser` is the k-diffusion view of the same model (Karras et al. 2022): inputs are
``x_sigma = x_t / alpha_t`` at noise levels ``sigma = sqrt((1 - a_t) / a_t)`` and it returns the denoised x0.
Both convert the network output with the model's parameterisation (parsed once), so eps-, x0- and v-prediction
models sample alike, and both route the network call through one guider (see guidance.py).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ldm.models.diffusion.guidance import CFGGuider, Conditioning, Guider
from ldm.models.diffusion.parameterization import NoisyInput, Parameterization, Prediction
from ldm.models.diffusion.schedule import extract, q_sample, sigma_to_t, sigmas_from_alphas_cumprod, t_to_sigma


class DiffusionModel(Protocol):
    """What samplers need of a model (the original's notebook API): a DDPM, a LatentDiffusion, or a stand-in."""

    alphas_cumprod: torch.Tensor
    parameterization: str

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...


class Denoiser:
    """The model at DDPM timesteps, its output converted to a :class:`Prediction` through a guider.

    :param model: a model with ``apply_model``, ``alphas_cumprod`` and ``parameterization`` (and, as a DDPM has,
        the ``sqrt_alphas_cumprod``/``sqrt_one_minus_alphas_cumprod`` buffers that its ``q_sample`` uses).
    :param guider: see guidance.py (default: no guidance).
    """

    def __init__(self, model: DiffusionModel, guider: Guider | None = None) -> None:
        self.model = model
        self.parameterization = Parameterization.parse(model.parameterization)
        self.guider = guider if guider is not None else CFGGuider()
        self.alphas_cumprod = model.alphas_cumprod
        sqrt_alphas = getattr(model, "sqrt_alphas_cumprod", None)
        sqrt_one_minus = getattr(model, "sqrt_one_minus_alphas_cumprod", None)
        if sqrt_alphas is None or sqrt_one_minus is None:
            sqrt_alphas, sqrt_one_minus = self.alphas_cumprod.sqrt(), (1 - self.alphas_cumprod).sqrt()
        self.sqrt_alphas, self.sqrt_one_minus_alphas = sqrt_alphas, sqrt_one_minus

    def predict(self, inp: NoisyInput, cond: Conditioning = None) -> Prediction:
        """The unguided prediction: one network call at ``(inp.x, inp.t)``."""
        return Prediction.from_output(self.parameterization, self.model.apply_model(inp.x, inp.t, cond), inp)

    def noisy_input(self, x: torch.Tensor, t: torch.Tensor) -> NoisyInput:
        """`x` at integer timesteps `t` ([N] long) with the schedule's alpha and sigma."""
        a = extract(self.alphas_cumprod, t, x.shape).to(x.dtype)
        return NoisyInput(x, t, a.sqrt(), (1 - a).sqrt())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning = None) -> Prediction:
        """The guided prediction for [N x C x ...] `x` at [N] long timesteps `t`."""
        return self.guider(self.predict, self.noisy_input(x, t), cond)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuses [N x C x ...] `x0` to timesteps `t` with the model's own tables."""
        noise = torch.randn_like(x0) if noise is None else noise
        return q_sample(x0, t, noise, self.sqrt_alphas, self.sqrt_one_minus_alphas)


class SigmaDenoiser:
    """The k-diffusion view of a VP model: ``D(x_sigma, sigma) -> x0`` with x_sigma = x_t / alpha_t.

    The timestep fed to the network is the continuous ``sigma_to_t(sigma)`` (interpolated in log sigma), or
    the nearest integer when `quantize` is set.
    """

    def __init__(self, model: DiffusionModel, guider: Guider | None = None, quantize: bool = False) -> None:
        self.inner = Denoiser(model, guider)
        self.quantize = quantize
        self.sigmas = sigmas_from_alphas_cumprod(model.alphas_cumprod.float())

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_t(sigma, self.sigmas)
        return t.round().long() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t_to_sigma(t, self.sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning = None) -> torch.Tensor:
        """The denoised [N x C x ...] x0 for `x` at noise level `sigma` (a scalar or an [N] Tensor)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        alpha = (1 / (1 + sigma ** 2).sqrt()).reshape(shape).to(x.dtype)
        inp = NoisyInput(x * alpha, self.sigma_to_t(sigma), alpha, sigma.reshape(shape).to(x.dtype) * alpha)
        return self.inner.guider(self.inner.predict, inp, cond).x0
