"""The small objects a diffusion training step holds, each chosen from the config: which timesteps to train on,
how to weight each example's loss, and the EMA of the network weights.

The defaults are the original's behaviour: uniform timesteps, unit weights, ``LitEma``. A new option is a class
with the interface below, named in the model config, e.g.::

    model:
      params:
        timestep_sampler_config: {target: my.module.LogitNormalTimesteps, params: {mean: 0.0, std: 1.0}}
        loss_weighting_config: {target: my.module.MinSNRWeighting, params: {gamma: 5.0}}
        ema_config: {target: my.module.WarmupEma, params: {decay: 0.9999}}

- a timestep sampler is built as ``target(num_timesteps=T, **params)`` and called as ``sampler(n, device)``,
  returning an [n] long Tensor in [0, T);
- a loss weighting is built as ``target(**params)`` and called as ``weighting(t, alphas_cumprod,
  parameterization)``, returning [N] per-example weights of the simple loss (t: [N] long, alphas_cumprod: [T]);
- an EMA is built as ``target(model, **params)`` (``model``: the DiffusionWrapper) and must be an ``nn.Module``
  (its state is checkpointed under ``model_ema.``) with LitEma's methods: ``ema(model)`` after each optimiser
  step, ``store(params)``, ``copy_to(model)``, ``restore(params)`` for ``ema_scope``.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch
from torch import nn

from ldm.models.diffusion.parameterization import Parameterization
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config


class TimestepSampler(Protocol):
    """``sampler(n, device) -> [n]`` long training timesteps in [0, num_timesteps)."""

    def __call__(self, n: int, device: torch.device) -> torch.Tensor: ...


class LossWeighting(Protocol):
    """``weighting(t, alphas_cumprod, parameterization) -> [N]`` weights of each example's simple loss."""

    def __call__(self, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 parameterization: Parameterization) -> torch.Tensor: ...


class UniformTimesteps:
    """Timesteps drawn uniformly from [0, num_timesteps) (Ho et al. 2020, Algorithm 1)."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def __call__(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device).long()


class UnitWeighting:
    """Every example weighs 1: the plain simple loss of the original."""

    def __call__(self, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 parameterization: Parameterization) -> torch.Tensor:
        return torch.ones(t.shape[0], device=t.device)


def build_timestep_sampler(config: Mapping[str, Any] | None, num_timesteps: int) -> TimestepSampler:
    """The configured timestep sampler (default :class:`UniformTimesteps`)."""
    if config is None:
        return UniformTimesteps(num_timesteps)
    return instantiate_from_config(config, num_timesteps=num_timesteps)


def build_loss_weighting(config: Mapping[str, Any] | None) -> LossWeighting:
    """The configured loss weighting (default :class:`UnitWeighting`)."""
    return UnitWeighting() if config is None else instantiate_from_config(config)


def build_ema(config: Mapping[str, Any] | None, model: nn.Module, decay: float) -> nn.Module:
    """The configured EMA of `model`'s trainable parameters (default ``LitEma(model, decay)``)."""
    if config is None:
        return LitEma(model, decay=decay)
    ema = instantiate_from_config(config, model=model)
    if not isinstance(ema, nn.Module):
        raise TypeError(f"ema_config must build an nn.Module (its state goes into checkpoints), got "
                        f"{type(ema).__name__}")
    return ema
