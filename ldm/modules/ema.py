"""Exponential moving average of a module's trainable parameters, with the original LitEma buffer names.

The shadow copies are buffers named by the parameter name with the dots removed (``input_blocks.0.0.weight``
becomes ``input_blocks00weight``), next to the buffers ``decay`` and ``num_updates``; inside a DDPM they appear
in the checkpoint as ``model_ema.diffusion_modelinput_blocks00weight`` etc., as written by the original code.

How the decay of the n-th update (n = 1, 2, ...) is chosen is a small :class:`DecaySchedule` object; the
schedules are plain attributes, not buffers, so the checkpoint layout is the same for every schedule:

- :class:`RatioWarmup` (the original): ``min(decay, (1 + n) / (10 + n))``;
- :class:`ConstantDecay`: ``decay`` from the first update on;
- :class:`PowerWarmup`: ``min(decay, max(min_decay, 1 - (1 + (n - 1) / inv_gamma) ** -power))``, the inverse-decay
  warm-up of k-diffusion's ``EMAWarmup`` (power 2/3 suits long runs, 3/4 short ones); the first update copies the
  weights;
- :class:`PowerFunctionProfile`: ``(1 - 1 / n) ** (gamma + 1)``, the power-function EMA of EDM2 (see power_ema.py);
  it has no asymptotic decay.

:func:`make_decay_schedule` builds one from a config mapping such as ``{"kind": "power", "power": 0.75}``.
"""
from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn

from ldm.util import parse_kind_config

logger = logging.getLogger(__name__)


def shadow_name(param_name: str) -> str:
    """The buffer name of a parameter's shadow copy (dots are not allowed in buffer names)."""
    return param_name.replace(".", "")


class DecaySchedule(Protocol):
    def __call__(self, n: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        """The decay of update number `n` (a 0-dim float Tensor, 1 for the first update) given the configured
        asymptotic `decay` (a 0-dim float Tensor); returns a 0-dim float Tensor in [0, 1]."""


@dataclass(frozen=True)
class ConstantDecay:
    """The configured decay at every update."""

    def __call__(self, n: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        return decay


@dataclass(frozen=True)
class RatioWarmup:
    """The original warm-up ``min(decay, (1 + n) / (10 + n))``."""

    def __call__(self, n: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        return torch.minimum(decay, (1 + n) / (10 + n))


@dataclass(frozen=True)
class PowerWarmup:
    """``min(decay, max(min_decay, 1 - (1 + (n - 1) / inv_gamma) ** -power))``: the decay grows as a power of
    the step count, so the average covers a fixed fraction of the run until it reaches `decay`.

    :param power: the exponent, > 0 (2/3 for long runs, 3/4 for short ones).
    :param inv_gamma: the step scale, > 0.
    :param min_decay: a floor for the decay in [0, 1).
    """

    power: float = 2.0 / 3.0
    inv_gamma: float = 1.0
    min_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (self.power > 0 and self.inv_gamma > 0 and 0.0 <= self.min_decay < 1.0):
            raise ValueError(f"EMA power warm-up needs power > 0, inv_gamma > 0 and 0 <= min_decay < 1, got "
                             f"power={self.power}, inv_gamma={self.inv_gamma}, min_decay={self.min_decay}")

    def __call__(self, n: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        value = 1 - (1 + (n - 1) / self.inv_gamma) ** -self.power
        return torch.minimum(decay, value.clamp(min=self.min_decay))


@dataclass(frozen=True)
class PowerFunctionProfile:
    """``(1 - 1/n) ** (gamma + 1)``: after n updates the average weighs the k-th weights by
    ``(k/n) ** (gamma + 1) - ((k-1)/n) ** (gamma + 1)`` (Karras et al. 2024, eq. 3); ignores the configured decay.

    Computed as ``exp((gamma + 1) * log1p(-1/n))``, accurate in float32 for any n.
    """

    gamma: float

    def __post_init__(self) -> None:
        if not self.gamma > 0:
            raise ValueError(f"power-function EMA exponent gamma must be positive, got {self.gamma}")

    def __call__(self, n: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
        return torch.exp((self.gamma + 1) * torch.log1p(-1 / n))


class EMASchedule(str, enum.Enum):
    RATIO = "ratio"
    CONSTANT = "constant"
    POWER = "power"


def make_decay_schedule(config: Mapping[str, Any] | str | None) -> DecaySchedule:
    """A decay schedule from a config: None or 'ratio' gives the original warm-up.

    :param config: None, a kind ('ratio', 'constant', 'power') or ``{"kind": ..., **params}`` where 'power'
        takes `power`, `inv_gamma` and `min_decay` (see :class:`PowerWarmup`).
    :raises ValueError: naming the key for an unknown kind or parameter.
    """
    kind, params = parse_kind_config(config, EMASchedule, EMASchedule.RATIO, "ema_schedule",
                                     {EMASchedule.RATIO: (), EMASchedule.CONSTANT: (),
                                      EMASchedule.POWER: ("power", "inv_gamma", "min_decay")})
    cls = {EMASchedule.RATIO: RatioWarmup, EMASchedule.CONSTANT: ConstantDecay, EMASchedule.POWER: PowerWarmup}[kind]
    return cls(**params)


class LitEma(nn.Module):
    """EMA of the trainable parameters of `model`: ``shadow -= (1 - decay_n) * (shadow - param)``.

    With ``use_num_upates`` (sic, the original's spelling) the updates are counted and the decay of update n
    follows `schedule` (by default the original warm-up ``min(decay, (1 + n) / (10 + n))``); without it the
    decay is constant.

    :param model: the module whose parameters with ``requires_grad`` are tracked.
    :param decay: the asymptotic decay in [0, 1].
    :param use_num_upates: whether to count the updates and follow `schedule`.
    :param schedule: the decay schedule (see the module docstring); None: :class:`RatioWarmup`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True,
                 schedule: DecaySchedule | None = None) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        if schedule is not None and not use_num_upates:
            raise ValueError("an EMA decay schedule needs the update count: use_num_upates=False means constant "
                             "decay")
        self.schedule: DecaySchedule = schedule if schedule is not None else RatioWarmup()
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = shadow_name(name)
                if s_name in self.m_name2s_name.values():
                    raise ValueError(f"EMA shadow name '{s_name}' of parameter '{name}' collides with another")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def current_decay(self) -> torch.Tensor:
        """The decay the next update uses (after counting it), as a 0-dim float Tensor."""
        if self.num_updates < 0:
            return self.decay
        return self.schedule(self.num_updates.float() + 1, self.decay)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update towards the current parameters of `model`."""
        decay = self.current_decay()
        if self.num_updates >= 0:
            self.num_updates += 1
        one_minus_decay = 1.0 - decay
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shadow = shadows[self._shadow_of(name)]
            shadow.sub_(one_minus_decay.to(shadow.dtype) * (shadow - param.to(shadow.dtype)))

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restarts the average at the current parameters of `model` (e.g. after a warm start that brought no EMA
        weights): every shadow is set to its parameter and the update count to zero (if counted)."""
        params = dict(model.named_parameters())
        shadows = dict(self.named_buffers())
        missing = [name for name in self.m_name2s_name if name not in params]
        if missing:
            raise KeyError(f"cannot reset the EMA from {type(model).__name__}: it lacks the tracked parameters "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for name, s_name in self.m_name2s_name.items():
            shadows[s_name].copy_(params[name])
        if self.num_updates >= 0:
            self.num_updates.zero_()

    def _shadow_of(self, name: str) -> str:
        try:
            return self.m_name2s_name[name]
        except KeyError:
            raise KeyError(f"parameter '{name}' has no EMA shadow: it was frozen or absent when the EMA was "
                           f"created") from None

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrites the trainable parameters of `model` with their EMA values."""
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(shadows[self._shadow_of(name)])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Saves copies of `parameters` for a later :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Puts back the values saved by :meth:`store` (in the same order) and releases them."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise RuntimeError(f"EMA restore got {len(parameters)} parameters but {len(self.collected_params)} "
                               f"were stored")
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)
        self.collected_params = []


@contextlib.contextmanager
def ema_weights(ema: Any, module: nn.Module, context: str | None = None) -> Iterator[None]:
    """Within this context `module`'s trainable parameters hold the EMA values of `ema` (anything with LitEma's
    ``store``/``copy_to``/``restore``); the training values are put back after, also on an exception.

    :param context: a name to log the switch under (None: no log lines).
    """
    ema.store(module.parameters())
    ema.copy_to(module)
    if context is not None:
        logger.info("%s: switched to EMA weights", context)
    try:
        yield
    finally:
        ema.restore(module.parameters())
        if context is not None:
            logger.info("%s: restored training weights", context)
