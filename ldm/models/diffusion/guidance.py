"""Classifier-free guidance (Ho & Salimans 2022) as one guider object around a model call.

A guider takes ``apply(x, t, cond)`` (the raw network output, any parameterisation) and returns the guided
output. :class:`CFGGuider` runs the unconditional and conditional branches in one batched forward and combines
them exactly as the original: ``uc + scale * (c - uc)``. Because eps, x0 and v are affine in the network
output at fixed x_t, guiding the raw output equals guiding eps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

Conditioning = Any  # a Tensor, a list of Tensors, a dict {"c_concat": [...], "c_crossattn": [...]}, or None
ApplyFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def concat_conditionings(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Stacks an unconditional and a conditional conditioning along the batch, matching their structure.

    Tensors are concatenated; lists item by item; dicts key by key. For dict (hybrid) conditionings, keys
    missing from `uncond` are shared with `cond` (e.g. ``c_concat``), and a non-dict `uncond` replaces
    ``c_crossattn`` (a negative prompt for a hybrid model).

    :return: a conditioning of the same structure with batch 2N: the unconditional half first.
    """
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping):
            uncond = {"c_crossattn": uncond}
        merged = {**cond, **uncond}
        unknown = set(merged) - set(cond)
        if unknown:
            raise ValueError(f"unconditional conditioning has keys {sorted(unknown)} that the conditioning "
                             f"lacks (it has {sorted(cond)})")
        return {k: concat_conditionings(merged[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        uncond = list(uncond) if isinstance(uncond, (list, tuple)) else [uncond]
        if len(uncond) != len(cond):
            raise ValueError(f"unconditional conditioning has {len(uncond)} items, the conditioning {len(cond)}")
        return [concat_conditionings(u, c) for u, c in zip(uncond, cond)]
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"unconditional conditioning must be a Tensor like the conditioning, "
                            f"got {type(uncond).__name__}")
        if uncond.shape[0] != cond.shape[0]:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
        if uncond.shape != cond.shape:
            raise ValueError(f"unconditional conditioning of shape {tuple(uncond.shape)} does not match the "
                             f"conditioning's {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    raise TypeError(f"cannot batch conditionings of type {type(cond).__name__} for guidance")


class CFGGuider:
    """Classifier-free guidance: ``uc + scale * (c - uc)`` from one batched forward of the model.

    :param scale: the guidance scale; 1 (or no `uncond`) makes the guider a plain conditional call.
    :param uncond: the unconditional (or negative) conditioning, structured like the conditioning.
    """

    def __init__(self, scale: float = 1.0, uncond: Conditioning = None) -> None:
        self.scale = float(scale)
        self.uncond = uncond

    @property
    def active(self) -> bool:
        return self.uncond is not None and self.scale != 1.0

    def __call__(self, apply: ApplyFn, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The guided network output for an [N x C x ...] `x` at [N] timesteps `t`."""
        if not self.active:
            return apply(x, t, cond)
        out_uncond, out_cond = apply(torch.cat([x, x]), torch.cat([t, t]),
                                     concat_conditionings(self.uncond, cond)).chunk(2)
        return out_uncond + self.scale * (out_cond - out_uncond)

    def __repr__(self) -> str:
        return f"CFGGuider(scale={self.scale}, uncond={'set' if self.uncond is not None else None})"
