"""Discrete-time sampling schedules: which DDPM timesteps a DDIM/PLMS/DDPM run visits, and their alphas.

The original's spacings are kept exactly: 'uniform' is ``range(0, T, T // S) + 1`` and 'quad' is
``(linspace(0, sqrt(0.8 T), S) ** 2).astype(int) + 1``; the +1 makes the last step land on alpha_1 -> alpha_0.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np
import torch

from ldm.util import parse_enum


class DDIMDiscretization(str, enum.Enum):
    UNIFORM = "uniform"
    QUAD = "quad"

    @classmethod
    def parse(cls, value: "str | DDIMDiscretization") -> "DDIMDiscretization":
        return parse_enum(cls, value, "ddim_discretize")


def make_ddim_timesteps(method: str | DDIMDiscretization, num_ddim_timesteps: int,
                        num_ddpm_timesteps: int) -> np.ndarray:
    """The increasing DDPM timesteps a DDIM run of `num_ddim_timesteps` steps visits (the original's spacing).

    :return: an int64 array; 'uniform' yields ``ceil(T / (T // S))`` entries, as in the original, less any
        past the end of the schedule.
    """
    method = DDIMDiscretization.parse(method)
    if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"the number of sampling steps must be in [1, {num_ddpm_timesteps}], "
                         f"got {num_ddim_timesteps}")
    if method is DDIMDiscretization.UNIFORM:
        steps = np.asarray(list(range(0, num_ddpm_timesteps, num_ddpm_timesteps // num_ddim_timesteps)))
    else:
        steps = (np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps) ** 2).astype(int)
    steps = (steps + 1).astype(np.int64)
    # where the original's 'uniform' spacing runs past the schedule (e.g. 3 of 1000 steps: 1, 334, 667, 1000),
    # the original indexed out of range; the steps beyond the schedule are dropped instead
    return steps[steps < num_ddpm_timesteps]


@dataclasses.dataclass
class DiscreteSchedule:
    """The per-step quantities of a discrete-time sampler, in increasing-timestep order (index i <-> step i).

    A sampler visits the indices from last to first; step i goes from ``alphas[i]`` to ``alphas_prev[i]``.
    All fields are [S] Tensors on one device: ``timesteps`` int64, the others float32. ``sigmas`` is the DDIM
    noise scale; the ``posterior_*`` fields define the ancestral (DDPM) step q(x_prev | x_t, x0):
    mean ``posterior_mean_coef1 * x0 + posterior_mean_coef2 * x_t``, log-variance ``posterior_log_variance``.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_log_variance: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, index: slice) -> "DiscreteSchedule":
        """The schedule of the first steps only (``schedule[:t_start]``, as img2img decoding uses)."""
        return DiscreteSchedule(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                  index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ([N x C x ...]) and log-variance of q(x_prev | x_t, x0) at schedule `index` (an int, or an [N]
        long Tensor of indices, one per example)."""
        if isinstance(index, torch.Tensor):
            shape = (-1, *([1] * (x_t.ndim - 1)))
            c1, c2, log_var = (v.to(x_t.device)[index].reshape(shape) for v in
                               (self.posterior_mean_coef1, self.posterior_mean_coef2, self.posterior_log_variance))
        else:
            c1, c2, log_var = (self.posterior_mean_coef1[index], self.posterior_mean_coef2[index],
                               self.posterior_log_variance[index])
        return c1 * x0 + c2 * x_t, log_var


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM noise scales (Song et al. 2021, eq. 16): eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))."""
    return eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))


def posterior_coefficients(alphas: torch.Tensor,
                           alphas_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coef of x0, coef of x_t, clipped log-variance) of q(x_prev | x_t, x0) between consecutive alphas-bar,
    computed in float64 (Ho et al. 2020, eqs. 6-7, with beta = 1 - a / a_prev)."""
    a, a_prev = alphas.double(), alphas_prev.double()
    beta = 1.0 - a / a_prev
    variance = beta * (1.0 - a_prev) / (1.0 - a)
    coef1 = a_prev.sqrt() * beta / (1.0 - a)
    coef2 = (a / a_prev).sqrt() * (1.0 - a_prev) / (1.0 - a)
    return coef1.float(), coef2.float(), variance.clamp(min=1e-20).log().float()


def ddim_schedule(alphas_cumprod: torch.Tensor, timesteps: np.ndarray | torch.Tensor,
                  eta: float = 0.0) -> DiscreteSchedule:
    """The schedule of a DDIM run over `timesteps`; the first step's previous alpha is ``alphas_cumprod[0]``.

    :param alphas_cumprod: the model's [T] float buffer.
    :param timesteps: increasing timesteps, e.g. from :func:`make_ddim_timesteps`.
    """
    ts = torch.as_tensor(np.asarray(timesteps), dtype=torch.long, device=alphas_cumprod.device)
    if ts.numel() == 0 or int(ts.max()) >= len(alphas_cumprod) or int(ts.min()) < 0:
        raise ValueError(f"timesteps must be non-empty and within [0, {len(alphas_cumprod) - 1}]")
    ac = alphas_cumprod.float()
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    return DiscreteSchedule(ts, alphas, alphas_prev, ddim_sigmas(alphas, alphas_prev, eta),
                            *posterior_coefficients(alphas, alphas_prev))


def full_schedule(alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor, eta: float = 0.0,
                  posterior: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> DiscreteSchedule:
    """The schedule over all T steps, ending at alpha = 1 (the original's ``use_original_steps`` path).

    With eta = 1 each step's noise is the DDPM posterior variance, so DDIM becomes ancestral DDPM.

    :param posterior: the model's ``(posterior_mean_coef1, posterior_mean_coef2,
        posterior_log_variance_clipped)`` buffers, to step exactly as the original DDPM; else computed.
    """
    ac, ac_prev = alphas_cumprod.float(), alphas_cumprod_prev.float().to(alphas_cumprod.device)
    ts = torch.arange(len(ac), device=ac.device)
    if posterior is None:
        posterior = posterior_coefficients(ac, ac_prev)
    return DiscreteSchedule(ts, ac, ac_prev, ddim_sigmas(ac, ac_prev, eta),
                            *(p.float().to(ac.device) for p in posterior))
