"""Tiny text-conditional models for the fine-tuning tests: a UNet with cross-attention inside a root module that
names its parts as a LatentDiffusion does (``model.diffusion_model``, ``cond_stage_model``)."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.ema import LitEma


def tiny_unet(context_dim: int = 16, seed: int = 0, **overrides) -> UNetModel:
    """A UNet with one spatial transformer (4 attention projections per attention) and perturbed weights, so that
    the zero-initialised output layers do not hide anything."""
    torch.manual_seed(seed)
    cfg = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
               num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
               transformer_depth=1, context_dim=context_dim)
    cfg.update(overrides)
    unet = UNetModel(**cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return unet


class Holder(nn.Module):
    """``diffusion_model`` inside, as DiffusionWrapper holds the UNet."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet


class TinyLDM(nn.Module):
    """``model.diffusion_model`` (the UNet), ``cond_stage_model`` (a linear text stand-in) and ``model_ema``."""

    def __init__(self, context_dim: int = 16, seed: int = 0, **unet_overrides) -> None:
        super().__init__()
        self.model = Holder(tiny_unet(context_dim, seed, **unet_overrides))
        self.cond_stage_model = nn.Linear(8, context_dim)
        self.model_ema = LitEma(self.model)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:param x: [N x 4 x 8 x 8]; :param t: [N]; :param tokens: [N x L x 8]. :return: [N x 4 x 8 x 8]."""
        return self.model.diffusion_model(x, t, context=self.cond_stage_model(tokens))


def batch(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, tokens, target) for a denoising-style regression on random data."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=gen), torch.randint(0, 1000, (n,), generator=gen),
            torch.randn(n, 3, 8, generator=gen), torch.randn(n, 4, 8, 8, generator=gen))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    """A few real optimiser steps of an MSE regression of `model(x, t, tokens)` on random targets."""
    for i in range(steps):
        x, t, tokens, target = batch(seed=i)
        loss = ((model(x, t, tokens) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
