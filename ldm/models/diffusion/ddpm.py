"""DDPM in pixel space, and the home the CompVis configs name for the diffusion models.

``ldm.models.diffusion.ddpm.DDPM``, ``.LatentDiffusion`` and ``.DiffusionWrapper`` resolve here. `DDPM` and
`LatentDiffusion` (latent_diffusion.py) are siblings on :class:`~ldm.models.diffusion.base.DiffusionModule`,
each with the original's notebook API and signatures.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ldm.models.diffusion import image_logging
from ldm.models.diffusion.base import DiffusionModule
from ldm.models.diffusion.conditioning import DiffusionWrapper, batch_tensor
from ldm.models.diffusion.first_stage import disabled_train
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.modules.ema import LitEma

__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "LitEma", "disabled_train"]


class DDPM(DiffusionModule):
    """Gaussian diffusion in pixel space (Ho et al. 2020), eps/x0/v-prediction, unconditional.

    Inputs are batches ``{first_stage_key: [N x H x W x C] in [-1, 1]}``; see the README of configs/ldm for keys.
    """

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` ([N x H x W x C] or [N x H x W]) as a contiguous float [N x C x H x W] Tensor."""
        return batch_tensor(batch, k)

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        return self(x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.p_losses(x, self.sample_timesteps(x), *args, **kwargs)

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for [N x C x H x W] `x_start` at [N] steps `t` with optional fixed `noise`."""
        return self.diffusion_loss(x_start, None, t, noise)

    # -- sampling (notebook API) ----------------------------------------------------------------------------
    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log-variance, each broadcastable to `x`."""
        return self.posterior_step(x, t, clip_denoised=clip_denoised)[:3]

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 repeat_noise: bool = False) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} ([N x C x H x W])."""
        mean, _, log_variance = self.p_mean_variance(x, t, clip_denoised)
        return self.posterior_sample(mean, log_variance, t, repeat_noise=repeat_noise)

    def p_sample_loop(self, shape: Sequence[int],
                      return_intermediates: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral sampling of a batch of `shape` ([N, C, H, W]) from pure noise."""
        result = self.ancestral(None, shape)
        return (result.samples, result.x_inter) if return_intermediates else result.samples

    def sample(self, batch_size: int = 16,
               return_intermediates: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        return self.p_sample_loop(self.latent_shape(batch_size), return_intermediates=return_intermediates)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: Sequence[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Inputs, a diffusion row and ancestral samples with their denoising row, all in [-1, 1]."""
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        x = x[:N]
        row = image_logging.diffusion_row(self.q_sample, x[:n_row], self.num_timesteps, self.log_every_t)
        log = {"inputs": x, "diffusion_row": image_logging.rows_grid(row)}
        if sample:
            with self.ema_scope("Plotting"):
                samples, denoise_row = self.sample(batch_size=N, return_intermediates=True)
            log["samples"] = samples
            log["denoise_row"] = image_logging.rows_grid(denoise_row)
        return image_logging.select(log, return_keys)
