"""Frozen sub-models of a LatentDiffusion: freezing, and :class:`FirstStageCodec`, the one place where images
become latents and latents images.

The first stage is any module with ``encode(x)`` returning a tensor (VQ interface, identity) or a distribution
with ``sample()``/``mode()`` (KL autoencoder), and ``decode(z)`` (optionally ``force_not_quantize=``).
"""
from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch import nn


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces ``module.train`` so that a frozen module stays in eval mode."""
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Puts `module` in eval mode for good (``train()`` is disabled) and stops its gradients."""
    module.eval()
    module.train = types.MethodType(disabled_train, module)
    for p in module.parameters():
        p.requires_grad = False
    return module


def mode_of(encoding: Any) -> Any:
    """The mode of a distribution (e.g. a KL posterior); tensors and anything else unchanged."""
    if isinstance(encoding, torch.Tensor) or not callable(getattr(encoding, "mode", None)):
        return encoding
    return encoding.mode()


class FirstStageCodec:
    """Encodes images to unscaled latents and decodes them, for a frozen first-stage module.

    Every first-stage call of a LatentDiffusion goes through one codec (the model scales latents by
    ``scale_factor`` around it); patch-wise encoding and decoding of large images is a codec that overrides
    :meth:`encode` and :meth:`decode`.

    :param module: the first stage (``encode``/``decode``, see the module docstring).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def encode(self, x: torch.Tensor) -> Any:
        """[N x C x H x W] images in [-1, 1] -> the encoding (a latent tensor or a distribution over it)."""
        return self.module.encode(x)

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Unscaled latents [N x c x h x w] -> images [N x C x H x W]; VQ interfaces quantise first unless
        `force_not_quantize`."""
        if accepts_force_not_quantize(self.module):
            return self.module.decode(z, force_not_quantize=force_not_quantize)
        return self.module.decode(z)

    @staticmethod
    def latent(encoding: Any) -> torch.Tensor:
        """A latent from an encoding: a sample of a distribution, or the tensor itself."""
        if isinstance(encoding, torch.Tensor):
            return encoding
        if callable(getattr(encoding, "sample", None)):
            return encoding.sample()
        raise TypeError(f"first-stage encoding of type '{type(encoding).__name__}' is neither a tensor nor "
                        f"a distribution with sample()")

    def codebook_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Latents from codebook ids: [N x h x w] ids or [N x K x h x w] logits -> [N x C x h x w]."""
        if ids.dim() == 4:
            ids = torch.argmax(ids.exp(), dim=1).long()
        entries = self.module.quantize.get_codebook_entry(ids, shape=None)
        return entries.permute(0, 3, 1, 2).contiguous()


def accepts_force_not_quantize(first_stage: nn.Module) -> bool:
    """Whether the first stage's ``decode`` takes ``force_not_quantize`` (the VQ interface)."""
    try:
        return "force_not_quantize" in inspect.signature(first_stage.decode).parameters
    except (TypeError, ValueError):
        return False

