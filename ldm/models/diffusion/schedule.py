"""The noise schedule: betas -> alphas_cumprod -> the DDPM buffers, sigmas, and t <-> sigma.

This module is the one place that computes the schedule; models and samplers read it from here.
"""
from __future__ import annotations

import enum
import math

import numpy as np
import torch

from ldm.util import parse_enum


class BetaSchedule(str, enum.Enum):
    LINEAR = "linear"            # linear in sqrt(beta), as in LDM
    COSINE = "cosine"            # Nichol & Dhariwal 2021
    SQRT_LINEAR = "sqrt_linear"  # linear in beta, as in DDPM
    SQRT = "sqrt"


# The twelve buffers of the original DDPM, in the order it registers them.
BUFFER_NAMES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def make_beta_schedule(schedule: str | BetaSchedule, n_timestep: int, linear_start: float = 1e-4,
                       linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
    """The betas of a named schedule as a float64 [n_timestep] array (the original's definitions)."""
    schedule = parse_enum(BetaSchedule, schedule, "beta_schedule")
    if n_timestep < 1:
        raise ValueError(f"timesteps must be positive, got {n_timestep}")
    if schedule is BetaSchedule.LINEAR:
        betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule is BetaSchedule.COSINE:
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    elif schedule is BetaSchedule.SQRT_LINEAR:
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    else:
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescales betas so that the final step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def schedule_buffers(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """The twelve float32 schedule buffers of the original DDPM, computed in float64 as it does.

    :param betas: a [T] array of betas.
    :param v_posterior: weight of beta_t in the posterior variance (0 gives beta-tilde).
    :return: a dict with the keys of :data:`BUFFER_NAMES`, each a [T] float32 Tensor.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    with np.errstate(divide="ignore"):
        values = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        }
        posterior_variance = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    values["posterior_variance"] = posterior_variance
    values["posterior_log_variance_clipped"] = np.log(np.maximum(posterior_variance, 1e-20))
    values["posterior_mean_coef1"] = betas * np.sqrt(ac_prev) / (1.0 - ac)
    values["posterior_mean_coef2"] = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    return {k: torch.tensor(values[k], dtype=torch.float32) for k in BUFFER_NAMES}


def lvlb_weights(buffers: dict[str, torch.Tensor], parameterization: str) -> torch.Tensor:
    """The per-step weights of the variational bound term, as the original computes them ([T] float32)."""
    betas, ac = buffers["betas"], buffers["alphas_cumprod"]
    if parameterization == "eps":
        w = betas ** 2 / (2 * buffers["posterior_variance"] * (1 - betas) * (1 - ac))
    elif parameterization == "x0":
        # the original's expression, including its operator precedence: 2. * 1 - ac
        w = 0.5 * torch.sqrt(ac) / (2.0 * 1 - ac)
    elif parameterization == "v":
        w = torch.ones_like(betas)
    else:
        raise ValueError(f"unknown parameterization '{parameterization}'")
    w = w.clone()
    w[0] = w[1]
    return w


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The variance-exploding noise levels sigma_t = sqrt((1 - a_t) / a_t) of a VP schedule."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Continuous timestep of each noise level, interpolating linearly in log sigma between the steps.

    :param sigma: an [N] Tensor of noise levels.
    :param sigmas: the [T] increasing noise levels of the discrete schedule.
    :return: an [N] float Tensor of timesteps in [0, T - 1].
    """
    log_sigmas = sigmas.log().to(sigma.device)
    log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
    low = torch.searchsorted(log_sigmas, log_sigma, right=True).sub(1).clamp(0, len(sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return (low + w).to(sigma.dtype)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level of continuous timesteps, interpolating linearly in log sigma (inverse of :func:`sigma_to_t`)."""
    log_sigmas = sigmas.log().to(t.device)
    t = t.float().clamp(0, len(sigmas) - 1)
    low = t.floor().long().clamp(max=len(sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gathers ``a[t]`` for a batch of timesteps and shapes it [N x 1 x ...] to broadcast against `x_shape`."""
    out = a.to(t.device).gather(-1, t.long())
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def q_sample(x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, sqrt_alphas: torch.Tensor,
             sqrt_one_minus_alphas: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0): ``sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` (Ho et al. 2020, eq. 4); the one q_sample.

    :param x_start: [N x C x ...] clean samples; :param noise: the same shape.
    :param t: [N] long indices into the two tables.
    :param sqrt_alphas: the table sqrt(a) ([T], e.g. the ``sqrt_alphas_cumprod`` buffer, or DDIM's own steps).
    :param sqrt_one_minus_alphas: the table sqrt(1 - a), same length.
    """
    return (extract(sqrt_alphas, t, x_start.shape) * x_start
            + extract(sqrt_one_minus_alphas, t, x_start.shape) * noise)

