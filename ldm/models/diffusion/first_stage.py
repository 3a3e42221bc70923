"""Frozen sub-models of a LatentDiffusion: freezing, first-stage encodings and decoding by duck typing.

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


def sample_encoding(encoder_posterior: Any) -> torch.Tensor:
    """A latent from a first-stage encoding: a sample of a distribution, or the tensor itself."""
    if isinstance(encoder_posterior, torch.Tensor):
        return encoder_posterior
    if callable(getattr(encoder_posterior, "sample", None)):
        return encoder_posterior.sample()
    raise TypeError(f"first-stage encoding of type '{type(encoder_posterior).__name__}' is neither a tensor nor "
                    f"a distribution with sample()")


def mode_of(encoding: Any) -> Any:
    """The mode of a distribution (e.g. a KL posterior); tensors and anything else unchanged."""
    if isinstance(encoding, torch.Tensor) or not callable(getattr(encoding, "mode", None)):
        return encoding
    return encoding.mode()


def accepts_force_not_quantize(first_stage: nn.Module) -> bool:
    """Whether the first stage's ``decode`` takes ``force_not_quantize`` (the VQ interface)."""
    try:
        return "force_not_quantize" in inspect.signature(first_stage.decode).parameters
    except (TypeError, ValueError):
        return False


def decode(first_stage: nn.Module, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
    """Decodes unscaled latents [N x C x h w] into images [N x 3 x H x W]."""
    if accepts_force_not_quantize(first_stage):
        return first_stage.decode(z, force_not_quantize=force_not_quantize)
    return first_stage.decode(z)


def codebook_latents(first_stage: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Latents from codebook ids: [N x h x w] ids or [N x K x h x w] logits -> [N x C x h x w]."""
    if z.dim() == 4:
        z = torch.argmax(z.exp(), dim=1).long()
    entries = first_stage.quantize.get_codebook_entry(z, shape=None)
    return entries.permute(0, 3, 1, 2).contiguous()
