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
    All fields are [S] Tensors on one device: ``timesteps`` int64, the others float32.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def __getitem__(self, index: slice) -> "DiscreteSchedule":
        """The schedule of the first steps only (``schedule[:t_start]``, as img2img decoding uses)."""
        return DiscreteSchedule(self.timesteps[index], self.alphas[index], self.alphas_prev[index],
                                self.sigmas[index])


def ddim_sigmas(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM noise scales (Song et al. 2021, eq. 16): eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))."""
    return eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))


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
    return DiscreteSchedule(ts, alphas, alphas_prev, ddim_sigmas(alphas, alphas_prev, eta))


def full_schedule(alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor,
                  eta: float = 0.0) -> DiscreteSchedule:
    """The schedule over all T steps, ending at alpha = 1 (the original's ``use_original_steps`` path).

    With eta = 1 each step's noise is the DDPM posterior variance, so DDIM becomes ancestral DDPM.
    """
    ac, ac_prev = alphas_cumprod.float(), alphas_cumprod_prev.float().to(alphas_cumprod.device)
    ts = torch.arange(len(ac), device=ac.device)
    return DiscreteSchedule(ts, ac, ac_prev, ddim_sigmas(ac, ac_prev, eta))
