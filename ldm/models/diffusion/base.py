"""`DiffusionModule`: what a pixel-space DDPM and a LatentDiffusion share, as a Lightning module that only wires
the pieces: the schedule buffers (schedule.py), the network behind a DiffusionWrapper (conditioning.py), the
training step's objects (timestep sampler, loss weighting, EMA; training.py), the loss (losses.py), sampling
(sampling.py), checkpoints and optimisers.

`DDPM` and `LatentDiffusion` are siblings built on it: each says how a batch becomes (x0, cond) and keeps the
original's notebook API with the original's signatures. Parameter and buffer names are the original CompVis
ones, so its checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.checkpoint import load_state_dict, load_weights
from ldm.finetune.recipe import FinetuneRecipe
from ldm.models.diffusion.conditioning import DiffusionWrapper, as_wrapper_kwargs
from ldm.models.diffusion.denoiser import Denoiser
from ldm.models.diffusion.discrete import ancestral_step, make_noise_sampler
from ldm.models.diffusion.guidance import Guider
from ldm.models.diffusion.losses import DiffusionLoss, LossType
from ldm.models.diffusion.parameterization import Parameterization, target
from ldm.models.diffusion.sampling import (SamplerKind, SamplingOptions, SamplingResult, model_full_schedule, sample,
                                           x0_transform)
from ldm.models.diffusion.schedule import (BUFFER_NAMES, extract, lvlb_weights, make_beta_schedule, q_sample,
                                           rescale_zero_terminal_snr, schedule_buffers)
from ldm.models.diffusion.training import OptionConfig, build_ema, build_loss_weighting, build_timestep_sampler
from ldm.modules.ema import ema_weights
from ldm.modules.power_ema import PosthocEMAConfig, PowerFunctionEMA
from ldm.performance import optimizer_options
from ldm.util import count_params, default, instantiate_from_config

logger = logging.getLogger(__name__)

POSTHOC_DIR = "posthoc_ema"


class DiffusionModule(pl.LightningModule):
    """Gaussian diffusion with a fixed variance schedule (Ho et al. 2020), eps/x0/v-prediction.

    :param timestep_sampling, loss_weighting, ema_schedule, ema_config: the training step's objects (see
        training.py); None keeps the original's uniform timesteps, unit weights and ``LitEma`` warm-up.
    :param warm_start, lora, finetune: fine-tuning sections (see ldm/finetune/recipe.py and docs/finetuning.md),
        applied once the whole model is built; the EMA then starts from the resulting weights.
    :param posthoc_ema: ``{sigma_rels, snapshot_every}``: keep power-function EMA profiles of the network and write
        their snapshots to ``<run>/posthoc_ema/`` (rank zero) for scripts/posthoc_ema.py.
    The other arguments are the original DDPM's; see the README of configs/ldm.
    """

    #: a subclass that builds more parts after ``DiffusionModule.__init__`` (the conditioner) sets this and calls
    #: :meth:`setup_finetuning` at the end of its own ``__init__``
    finishes_setup_in_subclass = False

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
                 timestep_sampling: OptionConfig = None,
                 loss_weighting: OptionConfig = None,
                 ema_schedule: OptionConfig = None,
                 ema_config: Mapping[str, Any] | None = None,
                 warm_start: Mapping[str, Any] | None = None,
                 lora: Mapping[str, Any] | None = None,
                 finetune: Mapping[str, Any] | None = None,
                 posthoc_ema: Mapping[str, Any] | None = None,
                 ) -> None:
        super().__init__()
        self.parameterization = Parameterization.parse(parameterization)
        logger.info("%s: running in %s-prediction mode", type(self).__name__, self.parameterization.value)
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
        self.ema_decay, self.ema_schedule, self.ema_config = ema_decay, ema_schedule, ema_config
        if use_ema:
            self.create_ema()
        self.recipe = FinetuneRecipe.from_config(warm_start, lora, finetune)
        self.posthoc_ema_config = None if posthoc_ema is None else PosthocEMAConfig.from_config(posthoc_ema)
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
        self.timestep_sampler = build_timestep_sampler(timestep_sampling, self.num_timesteps)
        self.loss_weighting = build_loss_weighting(loss_weighting)
        self.loss_type = LossType.parse(loss_type).value
        self.learn_logvar = learn_logvar
        logvar = torch.full(fill_value=float(logvar_init), size=(self.num_timesteps,))
        self.logvar = nn.Parameter(logvar, requires_grad=True) if learn_logvar else logvar
        self.loss_fn = DiffusionLoss(LossType.parse(loss_type), l_simple_weight, original_elbo_weight,
                                     log_logvar=learn_logvar)
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
        if not self.finishes_setup_in_subclass:
            self.setup_finetuning()

    def create_ema(self) -> None:
        """(Re)creates the EMA of the network's trainable parameters from their current values."""
        self.model_ema = build_ema(self.ema_config, self.model, self.ema_decay, self.ema_schedule)
        logger.info("keeping EMAs of %d tensors", len(list(self.model_ema.buffers())))

    def setup_finetuning(self) -> None:
        """Applies the warm start, LoRA adapters and train/freeze patterns (if configured), then starts the EMA
        from the resulting weights and adds the post-hoc EMA profiles; without these sections nothing changes."""
        if self.recipe.active:
            self.warm_start_report = self.recipe.apply(self)
            if self.warm_start_report is not None:
                self.restarted_from_ckpt = True  # e.g. keep the checkpoint's scale_factor
            self.check_recipe()
            if self.use_ema:
                self.create_ema()
        if self.posthoc_ema_config is not None:
            self.posthoc_ema = PowerFunctionEMA(self.model, self.posthoc_ema_config.sigma_rels)

    def check_recipe(self) -> None:
        """Refuses fine-tuning settings the model cannot train (subclasses add their checks)."""

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
            if self.parameterization is Parameterization.EPS:
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
    def ema_scope(self, context: str | None = None) -> contextlib.AbstractContextManager:
        """Within this context the model uses its EMA weights (if ``use_ema``); they are restored after."""
        return ema_weights(self.model_ema, self.model, context) if self.use_ema else contextlib.nullcontext()

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Loads weights from a checkpoint non-strictly, dropping keys that start with any of `ignore_keys`.

        :param only_model: load into ``self.model`` (the DiffusionWrapper) instead of the whole module.
        """
        target_module = self.model if only_model else self
        load_weights(target_module, load_state_dict(path), strict=False, ignore_prefixes=tuple(ignore_keys),
                     source=path)
        logger.info("restored %s from %s", type(target_module).__name__, path)
        self.restarted_from_ckpt = True

    # -- forward process -----------------------------------------------------------------------------------
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
        """Mean ([N x C x ...]), variance and clipped log-variance ([N x 1 x ...]) of q(x_{t-1} | x_t, x_0)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draws x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) for [N x C x ...] `x_start`, [N] `t`."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return q_sample(x_start, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) eps - sqrt(1 - a_t) x0`` ([N x C x ...])."""
        return self.get_target(x, noise, t, Parameterization.V)

    def get_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   parameterization: Parameterization | None = None) -> torch.Tensor:
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

    def sample_timesteps(self, x: torch.Tensor) -> torch.Tensor:
        """Training steps for a batch, an [N] long Tensor on x's device (from the timestep sampler)."""
        return self.timestep_sampler(x.shape[0], x.device)

    # -- the network and the loss --------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None,
                    return_ids: bool = False) -> torch.Tensor:
        """The network output for [N x C x h x w] `x_noisy` at [N] steps `t` with conditioning `cond`
        (a tensor, a list of tensors, a dict ``{"c_concat": [...], "c_crossattn": [...]}``, or None)."""
        out = self.model(x_noisy, t, **as_wrapper_kwargs(cond, self.model.key))
        if isinstance(out, tuple) and not return_ids:
            return out[0]
        return out

    def diffusion_loss(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of [N x C x H x W] `x_start` at [N] steps `t` given the encoded `cond`:
        noise, diffuse, predict, compare with the target, weigh."""
        noise = default(noise, lambda: self.sample_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        weights = self.loss_weighting(t, self.alphas_cumprod, self.parameterization)
        prefix = "train" if self.training else "val"
        return self.loss_fn(model_output, self.get_target(x_start, noise, t), t, self.logvar, self.lvlb_weights,
                            prefix, weights)

    # -- Lightning -------------------------------------------------------------------------------------------
    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch and its log dict."""
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=_batch_size(batch))
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
        n = _batch_size(batch)
        self.log_dict(loss_dict_no_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=n)
        self.log_dict(loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_ema:
            self.model_ema(self.model)
        if self.posthoc_ema_config is not None:
            self.posthoc_ema(self.model)
            if self.global_step % self.posthoc_ema_config.snapshot_every == 0:
                self.save_posthoc_snapshots()

    def save_posthoc_snapshots(self) -> None:
        """Rank zero writes the post-hoc EMA profiles to ``<run>/posthoc_ema/`` (named by the global step)."""
        if self.trainer.is_global_zero and self.posthoc_ema.num_updates > 0:
            self.posthoc_ema.save_snapshots(Path(self.trainer.default_root_dir) / POSTHOC_DIR, self.global_step)

    def on_train_end(self) -> None:
        if self.posthoc_ema_config is not None and self.global_step % self.posthoc_ema_config.snapshot_every:
            self.save_posthoc_snapshots()  # the last steps too
        self.save_lora_adapters()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_lora_adapters()

    def save_lora_adapters(self) -> None:
        """With a ``lora`` section, rank zero writes the adapter weights to ``<run>/lora.safetensors`` (with every
        checkpoint and at the end of training)."""
        if self.recipe.lora is not None and self.trainer.is_global_zero:
            self.recipe.save_adapters(self, self.trainer.default_root_dir)

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
        if self.recipe.active:
            groups = self.recipe.param_groups(self, lr)
            params = [p for g in groups for p in g["params"]]
            opt = torch.optim.AdamW(groups, lr=lr, **optimizer_options(self, params))
        else:
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

    # -- sampling ------------------------------------------------------------------------------------------------
    def latent_shape(self, n: int) -> tuple[int, int, int, int]:
        """The shape of a batch of `n` samples the network works on: [n x channels x image_size x image_size]."""
        return n, self.channels, self.image_size, self.image_size

    def ancestral(self, cond: Any, shape: Sequence[int], *, steps: int | None = None, x_T: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None, x0: torch.Tensor | None = None, quantize_denoised: bool = False,
                  temperature: float | Sequence[float] = 1.0, noise_dropout: float = 0.0,
                  log_every_t: int | None = None, verbose: bool = False,
                  callback: Any = None, guider: Guider | None = None) -> SamplingResult:
        """Ancestral (DDPM) sampling over the model's own steps from ``steps - 1`` (default: all) down to 0: the
        original's ``p_sample_loop`` and ``progressive_denoising``, through the one sampling path.

        :param temperature: one value, or one per timestep (indexed by t, as the original).
        """
        steps = self.num_timesteps if steps is None else min(steps, self.num_timesteps)
        if not isinstance(temperature, (int, float)):
            temperature = [temperature[i] for i in reversed(range(steps))]  # in sampling order
        options = SamplingOptions(sampler=SamplerKind.DDPM, steps=steps, clip_denoised=self.clip_denoised,
                                  quantize_denoised=quantize_denoised, temperature=temperature,
                                  noise_dropout=noise_dropout, log_every_t=log_every_t or self.log_every_t,
                                  progress=verbose)
        return sample(self, shape, cond, guider=guider, options=options, x_T=x_T, mask=mask, x0=x0,
                      schedule=model_full_schedule(self)[:steps], callback=callback)

    def posterior_step(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, clip_denoised: bool = False,
                       quantize_denoised: bool = False, guider: Guider | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t) as the posterior at the predicted x0 (clamped and/or quantised as asked):
        (mean, variance, log-variance, x0) of an [N x C x ...] `x` at [N] steps `t`."""
        x0 = Denoiser(self, guider)(x, t, cond).x0
        options = SamplingOptions(clip_denoised=clip_denoised, quantize_denoised=quantize_denoised)
        transform = x0_transform(self, options)
        if transform is not None:
            x0 = transform(x0)
        return (*self.q_posterior(x0, x, t), x0)

    @staticmethod
    def posterior_sample(mean: torch.Tensor, log_variance: torch.Tensor, t: torch.Tensor, repeat_noise: bool = False,
                         temperature: float = 1.0, noise_dropout: float = 0.0) -> torch.Tensor:
        """Draws x_{t-1} ~ N(mean, exp(log_variance) temperature^2) for [N x C x ...] `mean`; no noise at t = 0."""
        return ancestral_step(mean, log_variance, t, make_noise_sampler(temperature, noise_dropout, repeat_noise)(mean))

    def sampling_conditions(self, n: int, batch: Mapping[str, Any] | None,
                            guidance_scale: float) -> tuple[Any, Any]:
        """(cond, uncond) of `n` samples whose raw conditions come from `batch`; (None, None) when the model is
        unconditional."""
        return None, None

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples of the network's space as [N x 3 x H x W] images in [-1, 1]."""
        return samples

    @torch.no_grad()
    def sample_images(self, n: int, batch: Mapping[str, Any] | None = None,
                      options: SamplingOptions | Mapping[str, Any] | None = None, guidance_scale: float = 1.0,
                      use_ema: bool = True) -> torch.Tensor:
        """`n` samples as [n x 3 x H x W] images in [-1, 1], through the one sampling path (what the FID
        callback calls).

        :param batch: a batch of at least `n` items whose conditions (captions, labels, ...) condition the
            samples (conditional models only).
        :param options: :class:`SamplingOptions` or their keyword arguments (default: DDIM, 50 steps).
        :param guidance_scale: classifier-free guidance scale (with the null condition as uc).
        :param use_ema: sample with the EMA weights (when the model keeps them).
        """
        if not isinstance(options, SamplingOptions):
            options = SamplingOptions(**dict(options or {}))
        cond, uncond = self.sampling_conditions(n, batch, guidance_scale)
        with self.ema_scope() if use_ema else contextlib.nullcontext():
            z = sample(self, self.latent_shape(n), cond, uncond=uncond, scale=guidance_scale, options=options).samples
            return self.to_images(z)


def _batch_size(batch: Mapping[str, Any]) -> int | None:
    """The number of examples in a batch (the length of its first tensor), for ``self.log``'s epoch averages."""
    return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0), None)
