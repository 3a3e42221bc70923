"""The small objects a diffusion training step holds, each chosen from the config: which timesteps to train on,
how to weight each example's loss, and the EMA of the network weights (with its decay schedule).

The defaults are the original's behaviour: uniform timesteps, unit weights, ``LitEma`` with the original warm-up.
Each option is one model config key that takes either a built-in kind (a string, or a mapping with ``kind`` and
that kind's parameters) or a ``target`` of your own::

    model:
      params:
        timestep_sampling: {kind: logit_normal, mean: 0.0, std: 1.0}    # or 'uniform' (default)
        loss_weighting: {kind: min_snr, gamma: 5.0}                     # or 'none' (default)
        ema_schedule: {kind: power, power: 0.75}                        # or 'ratio' (default), 'constant'
        ema_config: {target: my.module.MyEma, params: {...}}            # replaces LitEma altogether

The interfaces (the built-in kinds live next to them):

- a timestep sampler (timestep_sampling.py, :class:`~ldm.models.diffusion.timestep_sampling.TimestepSampler`) is
  built as ``target(num_timesteps=T, **params)`` and called as ``sampler(n, device)``, returning an [n] long
  Tensor in [0, T);
- a loss weighting (weighting.py, :class:`~ldm.models.diffusion.weighting.LossWeighting`) is built as
  ``target(**params)`` and called as ``weighting(t, alphas_cumprod, parameterization)``, returning [N]
  per-example weights of the simple loss (t: [N] long, alphas_cumprod: [T]);
- an EMA decay schedule (ema.py, :class:`~ldm.modules.ema.DecaySchedule`) is built as ``target(**params)`` and
  called as ``schedule(n, decay)`` with the 0-dim update count n (1 for the first update);
- an EMA is built as ``target(model, **params)`` (``model``: the DiffusionWrapper) and must be an ``nn.Module``
  (its state is checkpointed under ``model_ema.``) with LitEma's methods: ``ema(model)`` after each optimiser
  step, ``store(params)``, ``copy_to(model)``, ``restore(params)`` for ``ema_scope``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

from torch import nn

from ldm.models.diffusion.timestep_sampling import TimestepSampler, make_timestep_sampler
from ldm.models.diffusion.weighting import LossWeighting, make_loss_weighting
from ldm.modules.ema import DecaySchedule, LitEma, make_decay_schedule
from ldm.util import instantiate_from_config

T = TypeVar("T")
OptionConfig = Mapping[str, Any] | str | None


def build_option(config: OptionConfig, key: str, from_kind: Callable[[OptionConfig], T], **target_kwargs: Any) -> T:
    """One training option from its config: a ``{target, params}`` mapping is instantiated with `target_kwargs`,
    anything else (None, a kind, ``{kind, ...}``) goes to `from_kind`.

    :raises ValueError: naming `key` for a mapping that mixes ``target`` with other keys than ``params``.
    """
    if isinstance(config, Mapping) and "target" in config:
        unknown = sorted(set(config) - {"target", "params"})
        if unknown:
            raise ValueError(f"{key} with a target takes only 'params' besides it, got {', '.join(unknown)} (use "
                             f"either {{kind: ...}} or {{target: ..., params: ...}})")
        return instantiate_from_config(config, **target_kwargs)
    return from_kind(config)


def build_timestep_sampler(config: OptionConfig, num_timesteps: int) -> TimestepSampler:
    """The configured timestep sampler (default: uniform, the original's draw)."""
    return build_option(config, "timestep_sampling", lambda c: make_timestep_sampler(c, num_timesteps),
                        num_timesteps=num_timesteps)


def build_loss_weighting(config: OptionConfig) -> LossWeighting:
    """The configured per-example loss weighting (default: unit weights)."""
    return build_option(config, "loss_weighting", make_loss_weighting)


def build_ema(config: Mapping[str, Any] | None, model: nn.Module, decay: float,
              schedule: OptionConfig = None) -> nn.Module:
    """The configured EMA of `model`'s trainable parameters (default ``LitEma(model, decay)`` with the decay
    schedule `schedule`, by default the original warm-up).

    :raises ValueError: when both a custom EMA (`config`) and a `schedule` are given.
    """
    if config is None:
        decay_schedule: DecaySchedule = build_option(schedule, "ema_schedule", make_decay_schedule)
        return LitEma(model, decay=decay, schedule=decay_schedule)
    if schedule is not None:
        raise ValueError("ema_schedule applies to the built-in LitEma; with ema_config give the schedule to your "
                         "EMA class's params instead")
    ema = instantiate_from_config(config, model=model)
    if not isinstance(ema, nn.Module):
        raise TypeError(f"ema_config must build an nn.Module (its state goes into checkpoints), got "
                        f"{type(ema).__name__}")
    return ema
