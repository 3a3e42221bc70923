"""Building blocks shared by the diffusion networks: timestep embeddings, normalisation, n-d layers, checkpointing.

Names and signatures follow the original (guided-diffusion / CompVis) helpers so that code and configs importing
them keep working. The noise schedule is *not* computed here: it lives in :mod:`ldm.models.diffusion.schedule`;
``make_beta_schedule``, ``extract_into_tensor`` and ``mean_flat`` are re-exported for the original import paths.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.models.diffusion.schedule import extract as extract_into_tensor
from ldm.models.diffusion.schedule import make_beta_schedule
from ldm.util import mean_flat

__all__ = ["timestep_embedding", "zero_module", "scale_module", "GroupNorm32", "normalization", "conv_nd", "linear",
           "avg_pool_nd", "checkpoint", "noise_like", "memory_format_of", "make_beta_schedule", "extract_into_tensor",
           "mean_flat"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal timestep embeddings as in the original (cosines first, then sines).

    ``emb[n, i] = cos(t_n * f_i)`` and ``emb[n, half + i] = sin(t_n * f_i)`` with
    ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; an odd `dim` gets a trailing zero column.

    :param timesteps: an [N] Tensor of (possibly fractional) timesteps.
    :param dim: the embedding width D.
    :param max_period: controls the lowest frequency.
    :param repeat_only: if True, return the timesteps repeated D times instead (no sinusoids).
    :return: an [N x D] float32 Tensor (or `timesteps`' dtype if `repeat_only`).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D [N] tensor, got shape {tuple(timesteps.shape)}")
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zeroes all parameters of `module` in place and returns it (used for residual output layers)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scales all parameters of `module` in place by `scale` and returns it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input's dtype (safe under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x ...] Tensor. :return: the normalised Tensor, same shape and dtype."""
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The standard normalisation layer of the UNet: 32 groups, float32 compute."""
    return GroupNorm32(32, channels)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution (arguments as for ``nn.Conv{dims}d``)."""
    if dims not in _CONVS:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return _CONVS[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """A linear layer (kept for the original's import paths)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling layer (arguments as for ``nn.AvgPool{dims}d``)."""
    if dims not in _AVG_POOLS:
        raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
    return _AVG_POOLS[dims](*args, **kwargs)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor] | None,
               flag: bool) -> Any:
    """Evaluates ``func(*inputs)``, recomputing activations in the backward pass when `flag` is set.

    Uses ``torch.utils.checkpoint`` (non-reentrant), so parameters need not be passed explicitly; `params`
    is accepted for the original's signature. Checkpointing is skipped when gradients are disabled.

    :param func: the function to evaluate.
    :param inputs: the positional arguments of `func`.
    :param params: ignored (the original needed them for its custom autograd function).
    :param flag: if False, simply call `func`.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an [N x C x H x W] Tensor is laid out in: ``channels_last`` or ``contiguous_format``.

    Blocks that reshape feature maps into token sequences and back use it to return their output in the layout
    of their input. A map in the other layout makes every following convolution convert its weight (forward and
    backward) to match the activations. Tensors that are both (1x1 maps) and other dims count as contiguous.
    """
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of `shape`; with `repeat`, one sample repeated over the batch dimension."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).expand(shape[0], *shape[1:]).clone()
    return torch.randn(tuple(shape), device=device)
