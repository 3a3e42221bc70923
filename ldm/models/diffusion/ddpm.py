"""DDPM in pixel space and LatentDiffusion as Lightning modules: orchestration only.

The schedule comes from schedule.py, targets and conversions from parameterization.py, the loss from
losses.py, the conditioning routing from conditioning.py and ancestral sampling from ancestral.py. Parameter and
buffer names are the original CompVis ones, so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import load_state_dict, load_weights
from ldm.models.diffusion import ancestral, image_logging
from ldm.models.diffusion.conditioning import DiffusionWrapper
from ldm.models.diffusion.first_stage import disabled_train
from ldm.models.diffusion.losses import DiffusionLoss, LossType
from ldm.models.diffusion.parameterization import Parameterization, target
from ldm.models.diffusion.schedule import (BUFFER_NAMES, extract, lvlb_weights, make_beta_schedule,
                                           rescale_zero_terminal_snr, schedule_buffers)
from ldm.modules.ema import LitEma
from ldm.performance import optimizer_options
from ldm.util import count_params, default, instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = ["DDPM", "LatentDiffusion", "DiffusionWrapper", "LitEma", "disabled_train"]


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a fixed variance schedule in pixel space (Ho et al. 2020), eps/x0/v-prediction.

    Inputs are batches ``{first_stage_key: [N x H x W x C] in [-1, 1]}``; see the README of configs/ldm for keys.
    """

    def __init__(self,
                 unet_config: Mapping[str, Any],
                 timesteps: int = 1000,
                 beta_schedule: str = "linear",
                 loss_type: str = "l2",
                 ckpt_path: str | None = None,
                 ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False,
                 monitor: str | None = "val/loss",
                 use_ema: bool = True,
                 first_stage_key: str = "image",
                 image_size: int = 256,
                 channels: int = 3,
                 log_every_t: int = 100,
                 clip_denoised: bool = True,
                 linear_start: float = 1e-4,
                 linear_end: float = 2e-2,
                 cosine_s: float = 8e-3,
                 given_betas: Sequence[float] | None = None,
                 original_elbo_weight: float = 0.0,
                 v_posterior: float = 0.0,
                 l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None,
                 parameterization: str = "eps",
                 scheduler_config: Mapping[str, Any] | None = None,
                 learn_logvar: bool = False,
                 logvar_init: float = 0.0,
                 zero_terminal_snr: bool = False,
                 noise_offset: float = 0.0,
                 ema_decay: float = 0.9999,
                 unet_trainable: bool = True,
                 ) -> None:
        super().__init__()
        self.parameterization = Parameterization.parse(parameterization).value
        logger.info("%s: running in %s-prediction mode", type(self).__name__, self.parameterization)
        self.cond_stage_model: nn.Module | None = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.noise_offset = noise_offset
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.unet_trainable = unet_trainable
        if not unet_trainable:
            self.model.requires_grad_(False)
        logger.info("%s has %.2fM parameters", type(self.model).__name__, count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
            logger.info("keeping EMAs of %d tensors", len(list(self.model_ema.buffers())))
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s,
                               zero_terminal_snr=zero_terminal_snr)
        self.loss_type = LossType.parse(loss_type).value
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=float(logvar_init), size=(self.num_timesteps,))
        self.logvar = nn.Parameter(logvar, requires_grad=True) if learn_logvar else logvar
        self.loss_fn = DiffusionLoss(LossType.parse(loss_type), l_simple_weight, original_elbo_weight,
                                     log_logvar=learn_logvar)
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # -- schedule ------------------------------------------------------------------------------------------
    def register_schedule(self, given_betas: Sequence[float] | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3, zero_terminal_snr: bool = False) -> None:
        """Registers the twelve schedule buffers (persistent, original order) and ``lvlb_weights``."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        if zero_terminal_snr:
            if self.parameterization == "eps":
                raise ValueError("zero_terminal_snr with parameterization 'eps': at zero SNR x0 cannot be recovered "
                                 "from eps (and the VLB weight is infinite); use parameterization 'v'")
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        buffers = schedule_buffers(betas, v_posterior=self.v_posterior)
        for name in BUFFER_NAMES:
            self.register_buffer(name, buffers[name])
        self.register_buffer("lvlb_weights", lvlb_weights(buffers, self.parameterization), persistent=False)
        if not self.lvlb_weights.is_meta and torch.isnan(self.lvlb_weights).all():
            raise ValueError("the VLB weights of this schedule are all NaN")

    # -- EMA and checkpoints -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Within this context the model uses its EMA weights (if ``use_ema``); they are restored after."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Loads weights from a checkpoint non-strictly, dropping keys that start with any of `ignore_keys`.

        :param only_model: load into ``self.model`` (the DiffusionWrapper) instead of the whole module.
        """
        target_module = self.model if only_model else self
        load_weights(target_module, load_state_dict(path), strict=False, ignore_prefixes=tuple(ignore_keys),
                     source=path)
        logger.info("restored %s from %s", type(target_module).__name__, path)
        self.restarted_from_ckpt = True

    # -- forward process and loss --------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor,
                        t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) for an [N x C x ...] `x_start` and [N] `t`."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 from x_t and eps: ``sqrt(1/a_t) x_t - sqrt(1/a_t - 1) eps`` ([N x C x ...])."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        return ancestral.q_posterior(self, x_start, x_t, t)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draws x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) for [N x C x ...] `x_start`, [N] `t`."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` ([N x C x ...])."""
        return self.get_target(x, noise, t, Parameterization.V)

    def get_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   parameterization: str | None = None) -> torch.Tensor:
        """The regression target of the network for `x_start` noised with `noise` at steps `t`."""
        alpha = extract(self.sqrt_alphas_cumprod, t, x_start.shape)
        sigma = extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape)
        return target(parameterization or self.parameterization, x_start, noise, alpha, sigma)

    def sample_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        """Training noise like `x_start`; with ``noise_offset`` a per-channel constant is added (offset noise)."""
        noise = torch.randn_like(x_start)
        if self.noise_offset > 0:
            offset = torch.randn(*x_start.shape[:2], *([1] * (x_start.ndim - 2)), device=x_start.device,
                                 dtype=x_start.dtype)
            noise = noise + self.noise_offset * offset
        return noise

    def denoise(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The network output at (x_noisy, t); the pixel-space DDPM ignores `cond`."""
        return self.model(x_noisy, t)

    def compute_loss(self, model_output: torch.Tensor, target_: torch.Tensor,
                     t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss and its log dict (see losses.py) for one batch."""
        prefix = "train" if self.training else "val"
        return self.loss_fn(model_output, target_, t, self.logvar, self.lvlb_weights, prefix)

    def p_losses(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for [N x C x H x W] `x_start` at [N] steps `t` with optional fixed `noise`."""
        noise = default(noise, lambda: self.sample_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        return self.compute_loss(self.denoise(x_noisy, t), self.get_target(x_start, noise, t), t)

    def sample_timesteps(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform random training steps, an [N] long Tensor on x's device."""
        return torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.p_losses(x, self.sample_timesteps(x), *args, **kwargs)

    # -- sampling (notebook API) ----------------------------------------------------------------------------
    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log-variance, each broadcastable to `x`."""
        return ancestral.p_mean_variance(self, self.denoise(x, t), x, t, clip_denoised)[:3]

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 repeat_noise: bool = False) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} ([N x C x H x W])."""
        mean, _, log_variance = self.p_mean_variance(x, t, clip_denoised)
        return ancestral.p_sample_step(mean, log_variance, t, repeat_noise=repeat_noise)

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int],
                      return_intermediates: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral sampling of a batch of `shape` ([N, C, H, W]) from pure noise."""
        img, intermediates = ancestral.sample_loop(self, self.denoise, shape, clip_denoised=self.clip_denoised,
                                                   log_every_t=self.log_every_t)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16,
               return_intermediates: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        return self.p_sample_loop((batch_size, self.channels, self.image_size, self.image_size),
                                  return_intermediates=return_intermediates)

    # -- Lightning -------------------------------------------------------------------------------------------
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` ([N x H x W x C] or [N x H x W]) as a contiguous float [N x C x H x W] Tensor."""
        if k not in batch:
            raise KeyError(f"batch has no key '{k}' (keys: {', '.join(map(str, batch))}); check first_stage_key/"
                           f"cond_stage_key in the model config")
        x = torch.as_tensor(batch[k])
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        return self(x)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        self.log_dict(loss_dict_no_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 2, sample: bool = True,
                   return_keys: Sequence[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Inputs, a diffusion row and ancestral samples with their denoising row, all in [-1, 1]."""
        return image_logging.log_images_ddpm(self, batch, N=N, n_row=n_row, sample=sample, return_keys=return_keys)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates: the UNet (if trainable) and a learned logvar."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self) -> Any:
        """AdamW at ``self.learning_rate`` (set by main.py), with a per-step LambdaLR from ``scheduler_config``."""
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise AttributeError(f"{type(self).__name__}.learning_rate is not set: main.py sets it from "
                                 f"model.base_learning_rate; set it before training")
        params = self.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=lr, **optimizer_options(self, params))
        if not self.use_scheduler:
            return opt
        if "target" not in self.scheduler_config:
            raise ValueError("scheduler_config needs a 'target' (e.g. ldm.lr_scheduler.LambdaLinearScheduler)")
        schedule = instantiate_from_config(self.scheduler_config)
        logger.info("setting up LambdaLR scheduler")
        scheduler = {"scheduler": LambdaLR(opt, lr_lambda=schedule.schedule), "interval": "step", "frequency": 1}
        return [opt], [scheduler]


# LatentDiffusion subclasses DDPM and lives in its own file; configs name it as ldm.models.diffusion.ddpm.
from ldm.models.diffusion.latent_diffusion import LatentDiffusion  # noqa: E402
