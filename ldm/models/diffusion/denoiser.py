"""One denoiser view of a diffusion model, for every sampler.

:class:`DiscreteDenoiser` is the model at integer DDPM timesteps (DDPM, DDIM, PLMS): ``(x_t, t, cond) -> (x0,
eps)``. :class:`SigmaDenoiser` is the k-diffusion view of the same model (Karras et al. 2022): inputs are
``x_sigma = x_t / alpha_t`` at noise levels ``sigma = sqrt((1 - a_t) / a_t)`` and it returns the denoised x0.
Both convert the network output with :func:`to_x0_eps`, so eps-, x0- and v-prediction models sample alike,
and both route the network call through a guider (classifier-free guidance).
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ldm.models.diffusion.guidance import CFGGuider, Conditioning
from ldm.models.diffusion.parameterization import Parameterization, to_x0_eps
from ldm.models.diffusion.schedule import extract, sigma_to_t, sigmas_from_alphas_cumprod, t_to_sigma


class DiffusionModel(Protocol):
    """What samplers need of a model (the original's notebook API)."""

    alphas_cumprod: torch.Tensor
    parameterization: str

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...


class DiscreteDenoiser:
    """The model at integer timesteps, its output converted to (x0, eps).

    :param model: a model with ``apply_model``, ``alphas_cumprod`` and ``parameterization``.
    :param guider: a :class:`CFGGuider` (default: no guidance).
    :param score_corrector: optional object with ``modify_score(model, eps, x, t, cond, **corrector_kwargs)``
        (eps-prediction models only, as in the original).
    """

    def __init__(self, model: DiffusionModel, guider: CFGGuider | None = None, score_corrector: Any = None,
                 corrector_kwargs: dict | None = None) -> None:
        self.model = model
        self.parameterization = Parameterization.parse(model.parameterization)
        self.guider = guider if guider is not None else CFGGuider()
        if score_corrector is not None and self.parameterization is not Parameterization.EPS:
            raise ValueError("score_corrector needs an eps-prediction model, this one predicts "
                             f"{self.parameterization.value}")
        self.score_corrector = score_corrector
        self.corrector_kwargs = corrector_kwargs or {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.model.alphas_cumprod

    def output(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning = None) -> torch.Tensor:
        """The guided (and score-corrected) network output for [N x C x ...] `x` at [N] timesteps `t`."""
        out = self.guider(self.model.apply_model, x, t, cond)
        if self.score_corrector is not None:
            out = self.score_corrector.modify_score(self.model, out, x, t, cond, **self.corrector_kwargs)
        return out

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) predicted from [N x C x ...] `x` at [N] long timesteps `t`; each shaped as `x`."""
        a = extract(self.model.alphas_cumprod, t, x.shape).to(x.dtype)
        return to_x0_eps(self.parameterization, self.output(x, t, cond), x, a.sqrt(), (1 - a).sqrt())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuses `x0` to timesteps `t` (the model's own ``q_sample`` where it has one)."""
        if hasattr(self.model, "q_sample"):
            return self.model.q_sample(x0, t) if noise is None else self.model.q_sample(x0, t, noise=noise)
        noise = torch.randn_like(x0) if noise is None else noise
        a = extract(self.model.alphas_cumprod, t, x0.shape).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


class SigmaDenoiser:
    """The k-diffusion view of a VP model: ``D(x_sigma, sigma) -> x0`` with x_sigma = x_t / alpha_t.

    The timestep fed to the network is the continuous ``sigma_to_t(sigma)`` (interpolated in log sigma), or
    the nearest integer when `quantize` is set.
    """

    def __init__(self, model: DiffusionModel, guider: CFGGuider | None = None, quantize: bool = False) -> None:
        self.inner = DiscreteDenoiser(model, guider)
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
        x_t = x * alpha
        out = self.inner.output(x_t, self.sigma_to_t(sigma), cond)
        x0, _ = to_x0_eps(self.inner.parameterization, out, x_t, alpha, sigma.reshape(shape).to(x.dtype) * alpha)
        return x0
