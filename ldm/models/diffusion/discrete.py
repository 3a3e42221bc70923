"""Discrete-time samplers over integer DDPM timesteps: ancestral DDPM, DDIM and PLMS.

Each is a function ``sample_x(model, x, schedule, extra_args=None, callback=None, disable=None, ...) -> x``
where `model` is a :class:`~ldm.models.diffusion.denoiser.Denoiser` (``(x, t, **extra_args) -> Prediction``)
and `schedule` a :class:`~ldm.models.diffusion.timesteps.DiscreteSchedule`. DDIM and PLMS share one update
rule, :func:`ddim_step`; they differ only in which eps they feed it. Inpainting (`mask`, `x0`) goes through
one blend, :func:`inpaint_blend`, before every step.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import trange

from ldm.models.diffusion.timesteps import DiscreteSchedule

NoiseSampler = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]
X0Transform = Callable[[torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped, placed and typed as `x`."""
    return torch.randn(x.shape, device=x.device, dtype=x.dtype)


def make_noise_sampler(temperature: float | Sequence[float] = 1.0, noise_dropout: float = 0.0,
                       repeat_noise: bool = False) -> NoiseSampler:
    """Step noise as the original draws it: standard normal times the temperature, then dropout.

    :param temperature: one value, or one per call in the order the sampler draws (one draw per step).
    :param repeat_noise: the same noise for every example of the batch.
    """
    temperatures = iter(temperature) if isinstance(temperature, Sequence) else None

    def noise_sampler(x: torch.Tensor) -> torch.Tensor:
        shape = (1, *x.shape[1:]) if repeat_noise else x.shape
        scale = next(temperatures) if temperatures is not None else temperature
        noise = torch.randn(shape, device=x.device, dtype=x.dtype).expand_as(x) * scale
        return torch.nn.functional.dropout(noise, p=noise_dropout) if noise_dropout > 0 else noise
    return noise_sampler


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma_t: torch.Tensor, noise: torch.Tensor, x0_transform: X0Transform | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from alpha-bar `a_t` to `a_prev` (Song et al. 2021, eq. 12).

    :param x: the [N x C x ...] sample at `a_t`; `eps` its predicted noise, `noise` fresh noise, same shape.
    :param a_t, a_prev, sigma_t: scalar (0-dim) Tensors.
    :param x0_transform: optional map applied to the predicted x0 (e.g. a VQ quantiser).
    :return: (x_prev, pred_x0), each shaped as `x`.
    """
    pred_x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
    if x0_transform is not None:
        pred_x0 = x0_transform(pred_x0)
    dir_xt = (1.0 - a_prev - sigma_t ** 2).clamp(min=0).sqrt() * eps
    return a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise, pred_x0


def ancestral_step(mean: torch.Tensor, log_variance: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """x_prev = mean + exp(log_variance / 2) * noise for an [N x C x ...] `mean`, without noise where t == 0."""
    nonzero = (t != 0).to(mean.dtype).reshape(-1, *((1,) * (mean.ndim - 1)))
    return mean + nonzero * (0.5 * log_variance).exp() * noise


def inpaint_blend(model, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None,
                  x0: torch.Tensor | None) -> torch.Tensor:
    """Inpainting: keeps ``q_sample(x0, t)`` where `mask` ([N x 1 x ...], broadcastable) is 1 and the sample
    where it is 0, before the step at `t` (as the original DDIM)."""
    if mask is None:
        return x
    if x0 is None:
        raise ValueError("a mask needs x0, the known latent to keep where the mask is 1")
    return model.q_sample(x0, t) * mask + (1.0 - mask) * x


def _steps(schedule: DiscreteSchedule, x: torch.Tensor, disable: bool | None
           ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields (i, index, t) from the last schedule index to the first; t is an [N] long Tensor."""
    n = len(schedule)
    for i in trange(n, disable=disable):
        index = n - 1 - i
        yield i, index, schedule.timesteps[index].to(x.device).expand(x.shape[0])


def _report(callback: Callback | None, i: int, index: int, t: torch.Tensor, x: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "index": index, "t": t, "x": x, "denoised": denoised})


def _coefficients(schedule: DiscreteSchedule, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index]


@torch.no_grad()
def sample_ddim(model, x: torch.Tensor, schedule: DiscreteSchedule, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None, mask: torch.Tensor | None = None,
                x0: torch.Tensor | None = None, x0_transform: X0Transform | None = None) -> torch.Tensor:
    """DDIM with the noise of ``schedule.sigmas`` (Song et al. 2021, "Denoising Diffusion Implicit Models")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler
    for i, index, t in _steps(schedule, x, disable):
        x = inpaint_blend(model, x, t, mask, x0)
        eps = model(x, t, **extra_args).eps
        x, pred_x0 = ddim_step(x, eps, *_coefficients(schedule, index), noise_sampler(x), x0_transform)
        _report(callback, i, index, t, x, pred_x0)
    return x


def plms_eps(eps: torch.Tensor, old_eps: list[torch.Tensor]) -> torch.Tensor:
    """The Adams-Bashforth combination of the current and up to three previous eps (orders 2 to 4)."""
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


@torch.no_grad()
def sample_plms(model, x: torch.Tensor, schedule: DiscreteSchedule, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None, mask: torch.Tensor | None = None,
                x0: torch.Tensor | None = None, x0_transform: X0Transform | None = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds")."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler
    old_eps: list[torch.Tensor] = []
    for i, index, t in _steps(schedule, x, disable):
        x = inpaint_blend(model, x, t, mask, x0)
        coefficients = _coefficients(schedule, index)
        eps = model(x, t, **extra_args).eps
        if old_eps:
            eps_prime = plms_eps(eps, old_eps)
        else:  # warm-up: a pseudo improved Euler (Heun) step, as the original
            x_next, _ = ddim_step(x, eps, *coefficients, noise_sampler(x), x0_transform)
            t_next = schedule.timesteps[max(index - 1, 0)].to(x.device).expand(x.shape[0])
            eps_next = model(x_next, t_next, **extra_args).eps
            eps_prime = (eps + eps_next) / 2
        x, pred_x0 = ddim_step(x, eps_prime, *coefficients, noise_sampler(x), x0_transform)
        old_eps = (old_eps + [eps])[-3:]
        _report(callback, i, index, t, x, pred_x0)
    return x


@torch.no_grad()
def sample_ddpm(model, x: torch.Tensor, schedule: DiscreteSchedule, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None,
                noise_sampler: NoiseSampler | None = None, mask: torch.Tensor | None = None,
                x0: torch.Tensor | None = None, x0_transform: X0Transform | None = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) at the predicted x0 (Ho et al. 2020,
    "Denoising Diffusion Probabilistic Models", Algorithm 2), with the schedule's posterior coefficients;
    no noise is added at t = 0."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler
    for i, index, t in _steps(schedule, x, disable):
        x = inpaint_blend(model, x, t, mask, x0)
        pred_x0 = model(x, t, **extra_args).x0
        if x0_transform is not None:
            pred_x0 = x0_transform(pred_x0)
        mean, log_variance = schedule.posterior(pred_x0, x, index)
        x = ancestral_step(mean, log_variance, t, noise_sampler(x))
        _report(callback, i, index, t, x, pred_x0)
    return x
