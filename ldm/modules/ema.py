"""Exponential moving average of a module's trainable parameters, with the original LitEma buffer names.

The shadow copies are buffers named by the parameter name with the dots removed (``input_blocks.0.0.weight``
becomes ``input_blocks00weight``), next to the buffers ``decay`` and ``num_updates``; inside a DDPM they appear
in the checkpoint as ``model_ema.diffusion_modelinput_blocks00weight`` etc., as written by the original code.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def shadow_name(param_name: str) -> str:
    """The buffer name of a parameter's shadow copy (dots are not allowed in buffer names)."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """EMA of the trainable parameters of `model`: ``shadow -= (1 - decay) * (shadow - param)``.

    With ``use_num_upates`` (sic, the original's spelling) the decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` where n counts the updates.

    :param model: the module whose parameters with ``requires_grad`` are tracked.
    :param decay: the asymptotic decay in [0, 1].
    :param use_num_upates: whether to warm the decay up with the number of updates.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
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
        n = self.num_updates.float() + 1
        return torch.minimum(self.decay, (1 + n) / (10 + n))

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
