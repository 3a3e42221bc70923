"""Ancestral DDPM sampling on a model's schedule buffers: the posterior q(x_{t-1} | x_t, x0) and the loop.

These back the notebook API of the original (``q_posterior``, ``p_mean_variance``, ``p_sample``,
``p_sample_loop``, ``progressive_denoising``); faster samplers live in ddim.py/plms.py/sampling.py.
`schedule` is any object with the twelve buffers of schedule.py and a ``parameterization`` (a DDPM).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ldm.models.diffusion.parameterization import to_x0_eps
from ldm.models.diffusion.schedule import extract

logger = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def q_posterior(schedule: Any, x_start: torch.Tensor, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), each shaped as `x_t` [N x C x ...]
    (the variances broadcast as [N x 1 x ...])."""
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
    return (mean, extract(schedule.posterior_variance, t, x_t.shape),
            extract(schedule.posterior_log_variance_clipped, t, x_t.shape))


def predict_x0(schedule: Any, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean sample an [N x C x ...] network output at (x_t, t) implies, for the model's parameterisation."""
    alpha = extract(schedule.sqrt_alphas_cumprod, t, x_t.shape)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
    return to_x0_eps(schedule.parameterization, model_output, x_t, alpha, sigma)[0]


def p_mean_variance(schedule: Any, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                    clip_denoised: bool, x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p(x_{t-1} | x_t) as the posterior at the predicted x0 (clipped to [-1, 1] if asked, then `x0_fn`).

    :return: (mean, variance, log-variance, predicted x0).
    """
    x_recon = predict_x0(schedule, model_output, x, t)
    if clip_denoised:
        x_recon = x_recon.clamp(-1.0, 1.0)
    if x0_fn is not None:
        x_recon = x0_fn(x_recon)
    mean, variance, log_variance = q_posterior(schedule, x_recon, x, t)
    return mean, variance, log_variance, x_recon


def p_sample_step(mean: torch.Tensor, log_variance: torch.Tensor, t: torch.Tensor, repeat_noise: bool = False,
                  temperature: float = 1.0, noise_dropout: float = 0.0) -> torch.Tensor:
    """Draws x_{t-1} ~ N(mean, exp(log_variance) * temperature^2); no noise where t == 0."""
    if repeat_noise:
        noise = torch.randn((1, *mean.shape[1:]), device=mean.device, dtype=mean.dtype).expand_as(mean)
    else:
        noise = torch.randn_like(mean)
    noise = noise * temperature
    if noise_dropout > 0.0:
        noise = torch.nn.functional.dropout(noise, p=noise_dropout)
    nonzero = (t != 0).to(mean.dtype).reshape(-1, *((1,) * (mean.ndim - 1)))
    return mean + nonzero * (0.5 * log_variance).exp() * noise


@torch.no_grad()
def sample_loop(schedule: Any, denoise: Denoiser, shape: Sequence[int], *, x_T: torch.Tensor | None = None,
                clip_denoised: bool = False, timesteps: int | None = None, start_T: int | None = None,
                mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, record_x0: bool = False,
                log_every_t: int = 100, temperature: float | Sequence[float] = 1.0, noise_dropout: float = 0.0,
                callback: Callable[[int], None] | None = None,
                img_callback: Callable[[torch.Tensor, int], None] | None = None,
                verbose: bool = True, device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ancestral sampling from step ``min(timesteps, start_T) - 1`` down to 0.

    :param denoise: ``(x_t [N x C x H x W], t [N]) -> model output``.
    :param mask: with `x0`, keeps ``q_sample(x0, t)`` where mask is 1 (inpainting), [N x 1 x H x W].
    :param record_x0: record the predicted x0 (progressive rows) instead of x_t in the intermediates.
    :return: (x_0 sample [N x C x H x W], intermediates recorded every `log_every_t` steps).
    """
    device = device if device is not None else schedule.betas.device
    img = torch.randn(tuple(shape), device=device) if x_T is None else x_T
    n = img.shape[0]
    total = schedule.num_timesteps if timesteps is None else timesteps
    if start_T is not None:
        total = min(total, start_T)
    if mask is not None and x0 is None:
        raise ValueError("sampling with a mask needs x0, the latent to keep where mask == 1")
    temperatures = [temperature] * total if isinstance(temperature, (int, float)) else list(temperature)
    intermediates = [] if record_x0 else [img]
    steps = reversed(range(total))
    for i in tqdm(steps, desc="Sampling t", total=total, disable=not verbose):
        ts = torch.full((n,), i, device=device, dtype=torch.long)
        mean, _, log_variance, x_recon = p_mean_variance(schedule, denoise(img, ts), img, ts, clip_denoised, x0_fn)
        img = p_sample_step(mean, log_variance, ts, temperature=temperatures[i], noise_dropout=noise_dropout)
        if mask is not None:
            img = schedule.q_sample(x0, ts) * mask + (1.0 - mask) * img
        if i % log_every_t == 0 or i == total - 1:
            intermediates.append(x_recon if record_x0 else img)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(img, i)
    return img, intermediates
