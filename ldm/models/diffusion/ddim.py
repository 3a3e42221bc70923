"""`DDIMSampler`: the original's notebook-facing DDIM class, a thin front-end over the one sampling path.

Call signatures and results are the original's (``sample(S, batch_size, shape, conditioning=..., eta=...,
unconditional_guidance_scale=..., ...) -> (samples, intermediates)``). Fixed: schedule tensors stay on the
model's device (the original moved them to "cuda"), and ``ddim_use_original_steps=True`` works (it raised).
``stochastic_encode``/``decode`` serve img2img, as in the Stable Diffusion release. Sampling runs under
``torch.inference_mode`` (see :mod:`ldm.models.diffusion.sampling`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ldm.models.diffusion.denoiser import Denoiser
from ldm.models.diffusion.discrete import ddim_step, make_noise_sampler
from ldm.models.diffusion.guidance import Conditioning, make_guider
from ldm.models.diffusion.sampling import (Precision, SamplerKind, SamplingOptions, model_full_schedule, sample,
                                           x0_transform)
from ldm.models.diffusion.schedule import q_sample
from ldm.models.diffusion.timesteps import DiscreteSchedule, ddim_schedule, make_ddim_timesteps
from ldm.util import parse_enum

logger = logging.getLogger(__name__)


def conditioning_batch_size(conditioning: Conditioning) -> int | None:
    """The batch size of a Tensor, list or dict conditioning (None when it has no tensor)."""
    if isinstance(conditioning, dict):
        conditioning = next(iter(conditioning.values()), None)
    if isinstance(conditioning, (list, tuple)):
        conditioning = conditioning[0] if conditioning else None
    return conditioning.shape[0] if isinstance(conditioning, torch.Tensor) else None


class DDIMSampler:
    """DDIM sampling of a diffusion model (Song et al. 2021), with the original's interface.

    :param model: a DDPM/LatentDiffusion (``apply_model``, ``alphas_cumprod``, ``alphas_cumprod_prev``,
        ``num_timesteps``, ``parameterization``, ``q_sample``).
    :param schedule: kept for signature compatibility; the noise schedule always comes from the model.
    :param precision: autocast on accelerators while sampling: ``full`` (default), ``autocast`` (float16) or
        ``bf16``.
    """

    name = "DDIM"
    kind = SamplerKind.DDIM

    def __init__(self, model: Any, schedule: str = "linear", precision: Precision | str = Precision.FULL) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.precision = parse_enum(Precision, precision, "precision")

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Selects the timesteps and computes ``ddim_alphas``, ``ddim_alphas_prev``, ``ddim_sigmas`` ([S])."""
        ac = self.model.alphas_cumprod
        if ac.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"the model has {ac.shape[0]} alphas_cumprod for {self.ddpm_num_timesteps} timesteps")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        ac = ac.detach().float()
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = self.model.alphas_cumprod_prev.detach().float().to(ac.device)
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self._ddim = ddim_schedule(ac, self.ddim_timesteps, ddim_eta)
        self._original = model_full_schedule(self.model, ddim_eta)
        self.ddim_alphas, self.ddim_alphas_prev = self._ddim.alphas, self._ddim.alphas_prev
        self.ddim_sigmas = self._ddim.sigmas
        self.ddim_sqrt_one_minus_alphas = (1.0 - self.ddim_alphas).sqrt()
        self.ddim_sigmas_for_original_num_steps = self._original.sigmas
        self.eta = ddim_eta
        if verbose:
            logger.info("%s timesteps %s, eta %s", self.name, self.ddim_timesteps.tolist(), ddim_eta)

    def sample(self, S: int, batch_size: int, shape: tuple[int, ...], conditioning: Conditioning = None,
               callback: Callable | None = None, normals_sequence: Any = None, img_callback: Callable | None = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: torch.Tensor | None = None,
               x0: torch.Tensor | None = None, temperature: float = 1.0, noise_dropout: float = 0.0,
               score_corrector: Any = None, corrector_kwargs: dict | None = None, verbose: bool = True,
               x_T: torch.Tensor | None = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Conditioning = None, ddim_discretize: str = "uniform"
               ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Samples a [batch_size x *shape] batch in `S` steps.

        :param shape: the per-sample shape, e.g. (C, H, W) of the latent.
        :param mask: [N x 1 x H x W] (or broadcastable) 1 where `x0` is kept (inpainting), with `x0` [N x C x H x W].
        :return: (samples, {"x_inter": [...], "pred_x0": [...]}) with intermediates every `log_every_t` steps.
        """
        cbs = conditioning_batch_size(conditioning)
        if cbs is not None and cbs != batch_size:
            logger.warning("got %d conditionings but batch size is %d", cbs, batch_size)
        if normals_sequence is not None:
            logger.warning("normals_sequence is ignored, as in the original")
        self.make_schedule(ddim_num_steps=S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        return self.ddim_sampling(
            conditioning, (batch_size, *shape), x_T=x_T, callback=callback, img_callback=img_callback,
            quantize_denoised=quantize_x0, mask=mask, x0=x0, temperature=temperature,
            noise_dropout=noise_dropout, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
            log_every_t=log_every_t, unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning, verbose=verbose)

    def _schedule(self, use_original_steps: bool, timesteps: int | None = None) -> DiscreteSchedule:
        if not hasattr(self, "_ddim"):
            raise RuntimeError("call make_schedule (or sample) first")
        schedule = self._original if use_original_steps else self._ddim
        if timesteps is None:
            return schedule
        if use_original_steps:
            return schedule[:timesteps]
        n = len(schedule)
        return schedule[:int(min(timesteps / n, 1) * n) - 1]  # the original's subset rule

    def ddim_sampling(self, cond: Conditioning, shape: tuple[int, ...], x_T: torch.Tensor | None = None,
                      ddim_use_original_steps: bool = False, callback: Callable | None = None,
                      timesteps: int | None = None, quantize_denoised: bool = False,
                      mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                      img_callback: Callable | None = None, log_every_t: int = 100, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: dict | None = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Conditioning = None,
                      verbose: bool = True) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The sampling loop of :meth:`sample` (x_T of `shape` [N x C x H x W] -> samples of that shape)."""
        def report(step: dict) -> None:
            if callback is not None:
                callback(step["i"])
            if img_callback is not None:
                img_callback(step["denoised"], step["i"])

        options = SamplingOptions(sampler=self.kind, steps=len(self.ddim_timesteps), eta=self.eta,
                                  temperature=temperature, noise_dropout=noise_dropout,
                                  quantize_denoised=quantize_denoised, log_every_t=log_every_t, progress=verbose,
                                  precision=self.precision)
        guider = make_guider(self.model, unconditional_guidance_scale, unconditional_conditioning, score_corrector,
                             corrector_kwargs)
        result = sample(self.model, shape, cond, guider=guider, options=options, x_T=x_T, mask=mask, x0=x0,
                        schedule=self._schedule(ddim_use_original_steps, timesteps), callback=report)
        return result.samples, result.intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Conditioning, t: torch.Tensor, index: int,
                      repeat_noise: bool = False, use_original_steps: bool = False, quantize_denoised: bool = False,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: dict | None = None, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Conditioning = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step of [N x C x H x W] `x` at timesteps `t` ([N]) and schedule `index`: (x_prev, pred_x0)."""
        schedule = self._schedule(use_original_steps)
        guider = make_guider(self.model, unconditional_guidance_scale, unconditional_conditioning, score_corrector,
                             corrector_kwargs)
        eps = Denoiser(self.model, guider)(x, t, c).eps
        noise = make_noise_sampler(temperature, noise_dropout, repeat_noise)(x)
        transform = x0_transform(self.model, SamplingOptions(quantize_denoised=quantize_denoised))
        return ddim_step(x, eps, schedule.alphas[index], schedule.alphas_prev[index], schedule.sigmas[index],
                         noise, transform)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuses [N x C x H x W] `x0` to the schedule indices `t` ([N] long) for img2img."""
        schedule = self._schedule(use_original_steps)
        noise = torch.randn_like(x0) if noise is None else noise
        return q_sample(x0, t.to(schedule.alphas.device), noise, schedule.alphas.sqrt(),
                        (1.0 - schedule.alphas).sqrt())

    def decode(self, x_latent: torch.Tensor, cond: Conditioning, t_start: int,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Conditioning = None,
               use_original_steps: bool = False, verbose: bool = True) -> torch.Tensor:
        """Denoises `x_latent` (encoded to index ``t_start - 1``) through the first `t_start` steps, by DDIM."""
        schedule = self._schedule(use_original_steps)[:t_start]
        options = SamplingOptions(sampler=SamplerKind.DDIM, steps=len(schedule), progress=verbose,
                                  precision=self.precision)
        return sample(self.model, x_latent.shape, cond, uncond=unconditional_conditioning,
                      scale=unconditional_guidance_scale, options=options, x_T=x_latent, schedule=schedule).samples
