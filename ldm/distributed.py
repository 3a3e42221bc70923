"""The few facts and collectives that model and data code need about the processes of a run.

Lightning's strategies (DDP, FSDP) start the processes and set up ``torch.distributed``; code below them only
needs to know its rank and the world size, and sometimes to agree with the other ranks on a value (a statistic of
the whole global batch, a gradient that DDP does not average). Every function here is a no-op in a single
process, so the same model code runs at any world size.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the world size: ``torch.distributed`` if initialised, else the ``RANK`` and
    ``WORLD_SIZE`` environment variables (set by torchrun and Lightning's launcher), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process (collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Replaces `tensor` (any shape, on this process's device) by its mean over all ranks; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Replaces `tensor` by its sum over all ranks; returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Averages the gradients of `parameters` over all ranks in one collective (flattened into one buffer).

    For parameters that DDP does not manage. Every rank must pass the same parameters, with gradients on the same
    ones (parameters without a gradient are left alone).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrites each tensor in place with rank `src`'s value."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


def global_mean_std(x: torch.Tensor, dims: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation of `x` over `dims` (all dims when None) and over the same tensor on
    every rank, as if the ranks' tensors were concatenated along the first of `dims`.

    Computed from float64 sums (count, sum, sum of squares), so every rank gets the same values.

    :param x: any [N x ...] Tensor, the same shape on every rank except along the reduced dims.
    :return: (mean, std) with the reduced dims removed, in x's dtype.
    """
    dims = tuple(range(x.ndim)) if dims is None else tuple(dims)
    x64 = x.detach().double()
    count = torch.tensor(float(math.prod(x.shape[d] for d in dims)), dtype=torch.float64, device=x.device)
    stats = torch.stack([x64.sum(dims).reshape(-1), x64.square().sum(dims).reshape(-1)])
    kept_shape = [s for d, s in enumerate(x.shape) if d not in dims]
    all_reduce_sum_(stats)
    all_reduce_sum_(count)
    mean = stats[0] / count
    var = (stats[1] - count * mean.square()) / (count - 1)
    std = var.clamp_min(0.0).sqrt()
    return mean.reshape(kept_shape).to(x.dtype), std.reshape(kept_shape).to(x.dtype)

