"""Noise-level schedules and samplers in sigma space (k-diffusion style).

Each sampler is ``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None) -> x`` where
`model` is a :class:`~ldm.models.diffusion.denoiser.SigmaDenoiser` (``(x, sigma, **extra_args) -> x0``),
`x` starts at noise level ``sigmas[0]`` (``x = noise * sigmas[0]``) and `sigmas` decrease to 0.
The discrete-time samplers (DDPM, DDIM, PLMS) live in :mod:`ldm.models.diffusion.discrete`; the one entry point
that picks a sampler by name is :mod:`ldm.models.diffusion.sampling`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import trange

from ldm.models.diffusion.discrete import NoiseSampler, default_noise_sampler

Callback = Callable[[dict], None]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise levels of Karras et al. 2022 (eq. 5): n levels from sigma_max to sigma_min, then 0 ([n + 1])."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho).float().to(device)


def get_sigmas_from_model(denoiser, n: int) -> torch.Tensor:
    """n of the model's own discrete noise levels, evenly spaced in t from T - 1 down to 0, then 0 ([n + 1])."""
    t = torch.linspace(len(denoiser.sigmas) - 1, 0, n, device=denoiser.sigmas.device)
    return append_zero(denoiser.t_to_sigma(t))


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_heun(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2 without churn); Euler on the last step."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, x, sigmas[i], denoised)
    return x


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): the deterministic target level and the noise to add for an ancestral step."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                              / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                           noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral Euler steps (Euler to sigma_down, then noise of sigma_up; k-diffusion, after Song et al. 2021)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(x) * sigma_up
        _report(callback, i, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, arXiv:2211.01095)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lam_next - lam
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (lam - (-sigmas[i - 1].log())) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
        _report(callback, i, x, sigmas[i], denoised)
    return x


def initial_noise_scale(sigma_max: torch.Tensor | float) -> float:
    """The std of x at sigma_max for data of unit variance, sqrt(1 + sigma_max^2) (x_T / alpha_T of a VP model)."""
    return math.sqrt(1.0 + float(sigma_max) ** 2)
