"""Which training timesteps to draw: uniform (the original) or logit-normal (Esser et al. 2024, SD3).

A sampler is called as ``sampler(n, device, generator=None)`` and returns an [n] long Tensor of discrete
timesteps in ``[0, num_timesteps)``; larger timesteps are noisier. :func:`make_timestep_sampler` builds one from a
config mapping such as ``{"kind": "logit_normal", "mean": 0.0, "std": 1.0}``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from ldm.util import parse_kind_config


class TimestepSampling(str, enum.Enum):
    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"


class TimestepSampler(Protocol):
    num_timesteps: int

    def __call__(self, n: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """An [n] long Tensor of timesteps in [0, num_timesteps) on `device`."""


def _check_num_timesteps(num_timesteps: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")


@dataclass(frozen=True)
class UniformTimesteps:
    """Timesteps drawn uniformly from ``[0, num_timesteps)``, exactly as the original training step draws them
    (one ``torch.randint`` call, so a seeded run draws the same timesteps as before)."""

    num_timesteps: int

    def __post_init__(self) -> None:
        _check_num_timesteps(self.num_timesteps)

    def __call__(self, n: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator).long()


@dataclass(frozen=True)
class LogitNormalTimesteps:
    """Timesteps whose continuous time ``u = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``, is logit-normal.

    ``u`` in (0, 1) maps to the discrete step ``floor(u * T)`` (clamped to ``T - 1``), so step ``k`` has probability
    ``Phi((logit((k + 1) / T) - mean) / std) - Phi((logit(k / T) - mean) / std)``. The density concentrates on the
    middle steps; a positive `mean` shifts it towards the noisier (larger) timesteps.

    :param num_timesteps: T.
    :param mean: location of the logit; 0 centres the density at T / 2.
    :param std: scale of the logit, > 0.
    """

    num_timesteps: int
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        _check_num_timesteps(self.num_timesteps)
        if not self.std > 0:
            raise ValueError(f"logit-normal timestep sampling needs std > 0, got {self.std}")

    def __call__(self, n: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n,), device=device, generator=generator, dtype=torch.float64)
        u = torch.sigmoid(self.mean + self.std * z)
        return (u * self.num_timesteps).floor().long().clamp_(0, self.num_timesteps - 1)


def make_timestep_sampler(config: Mapping[str, Any] | str | None, num_timesteps: int) -> TimestepSampler:
    """A timestep sampler from a config: None or 'uniform' gives the original uniform sampling.

    :param config: None, a kind ('uniform', 'logit_normal') or a mapping ``{"kind": ..., **params}``.
    :param num_timesteps: the length T of the model's schedule.
    :raises ValueError: naming the key for an unknown kind or parameter.
    """
    kind, params = parse_kind_config(config, TimestepSampling, TimestepSampling.UNIFORM, "timestep_sampling",
                                     {TimestepSampling.UNIFORM: (), TimestepSampling.LOGIT_NORMAL: ("mean", "std")})
    if kind is TimestepSampling.UNIFORM:
        return UniformTimesteps(num_timesteps)
    return LogitNormalTimesteps(num_timesteps, **params)
