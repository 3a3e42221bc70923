"""LatentDiffusion: a DDPM on ``scale_factor * E(x)`` conditioned on ``tau(y)`` (Rombach et al. 2022, 3.2-3.3).

Configs name it ``ldm.models.diffusion.ddpm.LatentDiffusion``; it is re-exported there.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.data import latent_cache
from ldm.models.diffusion import ancestral, first_stage, image_logging
from ldm.models.diffusion.conditioning import (as_wrapper_kwargs, drop_conditioning, is_text, null_input,
                                               resolve_conditioning_key)
from ldm.models.diffusion.ddpm import DDPM
from ldm.util import default, instantiate_from_config

logger = logging.getLogger(__name__)

# Conditioning keys whose batch values are passed to the conditioner as they are (not as images).
RAW_COND_KEYS = ("caption", "txt", "coordinates_bbox")


def slice_cond(cond: Any, n: int) -> Any:
    """The first `n` examples of a conditioning (tensor, list of tensors, or dict of either)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: slice_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, list) and cond and isinstance(cond[0], torch.Tensor):
        return [c[:n] for c in cond]
    return cond[:n]


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage, with an optional conditioning stage.

    :param first_stage_config: the autoencoder (frozen).
    :param cond_stage_config: the conditioner, or ``__is_first_stage__`` / ``__is_unconditional__``.
    :param num_timesteps_cond: with > 1, the conditioning is itself noised on a short schedule (legacy).
    :param cond_stage_key: batch key of the conditioning (``class_label`` passes the whole batch).
    :param cond_stage_trainable: train the conditioner jointly (else it is frozen and applied in get_input).
    :param concat_mode: legacy: without `conditioning_key`, True means concat and False crossattn.
    :param cond_stage_forward: name of the conditioner method to call instead of encode/forward.
    :param conditioning_key: None, concat, crossattn, hybrid or adm (see conditioning.py).
    :param scale_factor: latents are ``scale_factor * z``.
    :param scale_by_std: set ``scale_factor = 1 / std(z)`` from the first training batch (saved as a buffer).
    :param ucg_rate: conditioning dropout rate for classifier-free guidance (see conditioning.py for the rule).
    :param ucg_null_label: the null class of class-conditional models (default: ``n_classes - 1``).
    :param concat_mask_key: batch key of an [N x H x W x 1] mask in {0, 1} (1 = to fill) that is mapped to
        {-1, 1}, resized to the latent size and appended to the encoded concat conditioning, as the released
        inpainting model expects (scripts/inpaint.py): ``c = cat([E(masked_image), mask], 1)``.
    :param kwargs: the DDPM arguments (``timesteps``, ``unet_config``, ``ckpt_path``, ...).
    """

    def __init__(self,
                 first_stage_config: Mapping[str, Any],
                 cond_stage_config: Mapping[str, Any] | str,
                 num_timesteps_cond: int | None = None,
                 cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False,
                 concat_mode: bool = True,
                 cond_stage_forward: str | None = None,
                 conditioning_key: str | None = None,
                 scale_factor: float = 1.0,
                 scale_by_std: bool = False,
                 ucg_rate: float = 0.0,
                 ucg_null_label: int | None = None,
                 concat_mask_key: str | None = None,
                 **kwargs: Any) -> None:
        key = resolve_conditioning_key(conditioning_key, concat_mode, cond_stage_config)
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        load_only_unet = kwargs.pop("load_only_unet", False)
        super().__init__(conditioning_key=None if key is None else key.value, **kwargs)
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        if not 1 <= self.num_timesteps_cond <= self.num_timesteps:
            raise ValueError(f"num_timesteps_cond must be in [1, timesteps={self.num_timesteps}], "
                             f"got {self.num_timesteps_cond}")
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()
        if scale_by_std and scale_factor != 1.0:
            raise ValueError(f"scale_by_std sets scale_factor from the data; do not also give scale_factor "
                             f"({scale_factor})")
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.scale_by_std = scale_by_std
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        self.ucg_rate = ucg_rate
        self.ucg_null_label = ucg_null_label
        self.concat_mask_key = concat_mask_key
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.clip_denoised = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet)

    # -- construction -----------------------------------------------------------------------------------------
    def make_cond_schedule(self) -> None:
        """``cond_ids``: the conditioning noise step of each diffusion step (legacy num_timesteps_cond > 1)."""
        self.cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        self.cond_ids[:self.num_timesteps_cond] = ids

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        self.first_stage_model = first_stage.freeze(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> None:
        special = config if isinstance(config, str) else None
        if special is not None and self.cond_stage_trainable:
            raise ValueError(f"cond_stage_trainable is true but cond_stage_config is '{special}', which has "
                             f"nothing to train")
        if special == "__is_first_stage__":
            logger.info("using the first stage also as the conditioning stage")
            self.cond_stage_model = self.first_stage_model
        elif special == "__is_unconditional__":
            logger.info("training %s as an unconditional model", type(self).__name__)
            self.cond_stage_model = None
        elif special is not None:
            raise ValueError(f"cond_stage_config '{special}' is neither a config nor __is_first_stage__ / "
                             f"__is_unconditional__")
        elif self.cond_stage_trainable:
            self.cond_stage_model = instantiate_from_config(config)
        else:
            self.cond_stage_model = first_stage.freeze(instantiate_from_config(config))

    # -- scale_by_std ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """On the very first batch of a fresh run, sets ``scale_factor = 1 / std(z)`` (``scale_by_std``)."""
        fresh = self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
        if not (self.scale_by_std and fresh and not self.restarted_from_ckpt):
            return
        z = first_stage.sample_encoding(self.encode_batch(batch, self.first_stage_key)[1]).detach()
        scale = 1.0 / z.flatten().float().std()
        if self._trainer is not None:
            scale = self.trainer.strategy.broadcast(scale, src=0)
        self.scale_factor = scale.to(self.scale_factor)
        logger.info("scale_by_std: set scale_factor to %.6f", float(self.scale_factor))

    # -- first stage ------------------------------------------------------------------------------------------
    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """The scaled latent ``scale_factor * z`` ([N x C x h x w]) of a first-stage encoding."""
        return self.scale_factor * first_stage.sample_encoding(encoder_posterior)

    @torch.no_grad()
    def encode_batch(self, batch: Mapping[str, Any], k: str,
                     bs: int | None = None) -> tuple[torch.Tensor | None, Any]:
        """The images [N x C x H x W] of ``batch[k]`` and their first-stage encoding; a batch from a latent cache
        (scripts/cache_latents.py) carries the encoding itself, and no images (None)."""
        cached = latent_cache.cached_encoding(batch, self.first_stage_model, self.device, bs)
        if cached is not None:
            return None, cached
        x = DDPM.get_input(self, batch, k)[:bs].to(self.device)
        return x, self.encode_first_stage(x)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """``first_stage_model.encode`` of [N x 3 x H x W] images in [-1, 1] (a tensor or a distribution)."""
        return self.first_stage_model.encode(x)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        """Images [N x 3 x H x W] from scaled latents [N x C x h x w] (or codebook ids with `predict_cids`)."""
        if predict_cids:
            z = first_stage.codebook_latents(self.first_stage_model, z)
        z = z / self.scale_factor
        return first_stage.decode(self.first_stage_model, z, force_not_quantize=predict_cids or force_not_quantize)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    # -- conditioning -----------------------------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> Any:
        """tau(c): the conditioner applied to a raw conditioning (captions, a batch dict, a tensor)."""
        if self.cond_stage_model is None:
            raise RuntimeError("this model is unconditional (cond_stage_config: __is_unconditional__)")
        if isinstance(c, torch.Tensor):
            c = c.to(self.device)
        if self.cond_stage_forward is not None:
            fn = getattr(self.cond_stage_model, self.cond_stage_forward, None)
            if not callable(fn):
                raise AttributeError(f"cond_stage_forward '{self.cond_stage_forward}' is not a method of "
                                     f"{type(self.cond_stage_model).__name__}")
            return fn(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            return first_stage.mode_of(self.cond_stage_model.encode(c))
        return self.cond_stage_model(c)

    @property
    def label_key(self) -> str:
        """The batch key holding class labels for a class conditioner."""
        return getattr(self.cond_stage_model, "key", None) or self.cond_stage_key

    @property
    def null_label(self) -> int | None:
        """The null class of classifier-free guidance: ``ucg_null_label`` or the embedder's ``n_classes - 1``."""
        if self.ucg_null_label is not None:
            return self.ucg_null_label
        n_classes = getattr(self.cond_stage_model, "n_classes", None)
        return None if n_classes is None else int(n_classes) - 1

    def get_unconditional_conditioning(self, batch_size: int, like: Any = None) -> Any:
        """The encoded null condition of a batch (empty captions, the null class, or zeros like `like`)."""
        if self.model.conditioning_key is None:
            return None
        if like is None:
            if self.cond_stage_key == "class_label" or hasattr(self.cond_stage_model, "n_classes"):
                labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)
                like = {self.label_key: labels}
            elif self.cond_stage_key in ("caption", "txt"):
                like = [""] * batch_size
            else:
                raise ValueError(f"cannot infer the null condition of cond_stage_key '{self.cond_stage_key}'; "
                                 f"pass an example raw conditioning as `like`")
        xc = null_input(slice_cond(like, batch_size), self.null_label, self.label_key)
        return self.get_learned_conditioning(xc)

    def raw_conditioning(self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor) -> Any:
        """The raw conditioning of a batch: captions/boxes as given, the batch for class labels, else an image."""
        if cond_key == self.first_stage_key:
            return x
        if cond_key == "class_label":
            return batch
        if cond_key not in batch:
            raise KeyError(f"batch has no conditioning key '{cond_key}' (keys: {', '.join(map(str, batch))}); "
                           f"check cond_stage_key in the model config")
        value = batch[cond_key]
        if cond_key in RAW_COND_KEYS or is_text(value):
            return value
        return DDPM.get_input(self, batch, cond_key).to(self.device)

    def apply_cond_dropout(self, xc: Any) -> Any:
        """Conditioning dropout for classifier-free guidance with probability ``ucg_rate`` per example."""
        n = len(xc[self.label_key]) if isinstance(xc, Mapping) else len(xc)
        drop = torch.rand(n, device=self.device) < self.ucg_rate
        return drop_conditioning(xc, drop, self.null_label, self.label_key)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: str | None = None, return_original_cond: bool = False,
                  bs: int | None = None, cond_dropout: bool = False) -> list[Any]:
        """``[z, c]`` (+ ``[x, xrec]``, + ``[xc]``): scaled latents [N x C x h x w] and the conditioning.

        `c` is encoded unless the conditioner is trainable (then it is encoded in :meth:`forward`) or
        `force_c_encode`; with `cond_dropout`, ``ucg_rate`` of the raw conditioning is replaced by the null one.
        """
        x, encoding = self.encode_batch(batch, k, bs)
        z = self.get_first_stage_encoding(encoding).detach()
        if x is None and (return_first_stage_outputs or (cond_key or self.cond_stage_key) == self.first_stage_key):
            x = self.decode_first_stage(z)  # cached batches hold no images: their latents' decoding stands in
        c = xc = None
        if self.model.conditioning_key is not None:
            xc = self.raw_conditioning(batch, cond_key or self.cond_stage_key, x)
            if cond_dropout and self.ucg_rate > 0:
                xc = self.apply_cond_dropout(xc)
            c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
            if bs is not None and not isinstance(c, Mapping):
                c = slice_cond(c, bs)
            if self.concat_mask_key is not None:
                c = torch.cat([c, self.latent_mask(batch, z)], dim=1)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def latent_mask(self, batch: Mapping[str, Any], z: torch.Tensor) -> torch.Tensor:
        """The batch's ``concat_mask_key`` mask as [N x 1 x h x w] in {-1, 1} at the latent size of `z`."""
        mask = DDPM.get_input(self, batch, self.concat_mask_key)[:z.shape[0]].to(z)
        return torch.nn.functional.interpolate(2.0 * mask - 1.0, size=z.shape[-2:])

    # -- training ---------------------------------------------------------------------------------------------
    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key, cond_dropout=self.training)
        return self(x, c)

    def noised_cond(self, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditioning noised at ``cond_ids[t]`` (legacy ``num_timesteps_cond > 1``), else unchanged."""
        if not self.shorten_cond_schedule:
            return cond
        if isinstance(cond, (Mapping, list)):
            raise ValueError("num_timesteps_cond > 1 needs a single tensor conditioning")
        tc = self.cond_ids.to(t.device)[t]
        return self.q_sample(x_start=cond, t=tc, noise=torch.randn_like(cond.float()))

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        t = self.sample_timesteps(x)
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError(f"conditioning_key is '{self.model.conditioning_key}' but no conditioning given")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            c = self.noised_cond(c, t)
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any,
                    return_ids: bool = False) -> torch.Tensor:
        """The network output for [N x C x h x w] `x_noisy` at [N] steps `t` with conditioning `cond`
        (a tensor, a list of tensors, or a dict ``{"c_concat": [...], "c_crossattn": [...]}``)."""
        out = self.model(x_noisy, t, **as_wrapper_kwargs(cond, self.model.key))
        if isinstance(out, tuple) and not return_ids:
            return out[0]
        return out

    def denoise(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.apply_model(x_noisy, t, cond)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for latents [N x C x h x w] at [N] steps `t` given the (encoded) conditioning."""
        noise = default(noise, lambda: self.sample_noise(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        return self.compute_loss(model_output, self.get_target(x_start, noise, t), t)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            logger.info("%s: also optimizing conditioner params", type(self).__name__)
            params.extend(p for p in self.cond_stage_model.parameters() if p.requires_grad)
        return params

    # -- sampling (notebook API) ----------------------------------------------------------------------------
    def denoiser(self, cond: Any, score_corrector: Any = None,
                 corrector_kwargs: Mapping[str, Any] | None = None) -> ancestral.Denoiser:
        """``(x_t, t) -> model output`` with `cond` (noised for num_timesteps_cond > 1) and a score corrector."""
        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            c = self.noised_cond(cond, t) if cond is not None else None
            out = self.apply_model(x, t, c)
            if score_corrector is not None:
                if self.parameterization != "eps":
                    raise ValueError("score_corrector needs an eps-prediction model")
                out = score_corrector.modify_score(self, out, x, t, c, **(corrector_kwargs or {}))
            return out
        return denoise

    def quantizer(self, quantize_denoised: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Snaps predicted x0 to the first stage's codebook when `quantize_denoised` (VQ first stages)."""
        if not quantize_denoised:
            return None
        return lambda x0: self.first_stage_model.quantize(x0)[0]

    def p_mean_variance(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool,
                        quantize_denoised: bool = False, return_x0: bool = False, score_corrector: Any = None,
                        corrector_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """p(x_{t-1} | x_t, c): (mean, variance, log-variance[, predicted x0])."""
        out = self.denoiser(c, score_corrector, corrector_kwargs)(x, t)
        mean, var, log_var, x0 = ancestral.p_mean_variance(self, out, x, t, clip_denoised,
                                                            self.quantizer(quantize_denoised))
        return (mean, var, log_var, x0) if return_x0 else (mean, var, log_var)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool = False,
                 repeat_noise: bool = False, quantize_denoised: bool = False, return_x0: bool = False,
                 temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                 corrector_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ([N x C x h x w]); with `return_x0` also the predicted x0."""
        mean, _, log_var, x0 = self.p_mean_variance(x, c, t, clip_denoised, quantize_denoised, True,
                                                    score_corrector, corrector_kwargs)
        img = ancestral.p_sample_step(mean, log_var, t, repeat_noise, temperature, noise_dropout)
        return (img, x0) if return_x0 else img

    @torch.no_grad()
    def progressive_denoising(self, cond: Any, shape: Sequence[int], verbose: bool = True,
                              callback: Callable[[int], None] | None = None, quantize_denoised: bool = False,
                              img_callback: Callable[[torch.Tensor, int], None] | None = None,
                              mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                              temperature: float | Sequence[float] = 1.0, noise_dropout: float = 0.0,
                              score_corrector: Any = None, corrector_kwargs: Mapping[str, Any] | None = None,
                              batch_size: int | None = None, x_T: torch.Tensor | None = None,
                              start_T: int | None = None,
                              log_every_t: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Ancestral sampling recording the predicted x0 every `log_every_t` steps.

        :param shape: [C, h, w] with `batch_size`, else [N, C, h, w].
        """
        if batch_size is not None:
            shape = [batch_size, *shape]
        cond = slice_cond(cond, shape[0])
        return ancestral.sample_loop(
            self, self.denoiser(cond, score_corrector, corrector_kwargs), shape, x_T=x_T,
            clip_denoised=self.clip_denoised, start_T=start_T, mask=mask, x0=x0,
            x0_fn=self.quantizer(quantize_denoised), record_x0=True, log_every_t=log_every_t or self.log_every_t,
            temperature=temperature, noise_dropout=noise_dropout, callback=callback, img_callback=img_callback,
            verbose=verbose, device=self.device)

    @torch.no_grad()
    def p_sample_loop(self, cond: Any, shape: Sequence[int], return_intermediates: bool = False,
                      x_T: torch.Tensor | None = None, verbose: bool = True,
                      callback: Callable[[int], None] | None = None, timesteps: int | None = None,
                      quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                      x0: torch.Tensor | None = None, img_callback: Callable[[torch.Tensor, int], None] | None = None,
                      start_T: int | None = None, log_every_t: int | None = None) -> Any:
        """Ancestral sampling of latents of `shape` ([N, C, h, w]); returns x_0 (and the x_t every few steps)."""
        img, intermediates = ancestral.sample_loop(
            self, self.denoiser(cond), shape, x_T=x_T, clip_denoised=self.clip_denoised, timesteps=timesteps,
            start_T=start_T, mask=mask, x0=x0, x0_fn=self.quantizer(quantize_denoised),
            log_every_t=log_every_t or self.log_every_t, callback=callback, img_callback=img_callback,
            verbose=verbose, device=self.device)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: torch.Tensor | None = None, verbose: bool = True, timesteps: int | None = None,
               quantize_denoised: bool = False, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               shape: Sequence[int] | None = None) -> Any:
        """Ancestral samples of ``batch_size`` latents [N x channels x image_size x image_size]."""
        shape = default(shape, (batch_size, self.channels, self.image_size, self.image_size))
        return self.p_sample_loop(slice_cond(cond, batch_size), shape, return_intermediates=return_intermediates,
                                  x_T=x_T, verbose=verbose, timesteps=timesteps,
                                  quantize_denoised=quantize_denoised, mask=mask, x0=x0)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: int | None = 200, ddim_eta: float = 1.0, return_keys: Sequence[str] | None = None,
                   quantize_denoised: bool = True, inpaint: bool = True, plot_denoise_rows: bool = False,
                   plot_progressive_rows: bool = True, plot_diffusion_rows: bool = True,
                   unconditional_guidance_scale: float = 1.0, split: str | None = None,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] for the image logger: inputs, reconstruction, conditioning, diffusion row,
        samples (DDIM with `ddim_steps`, else ancestral), guided samples, inpainting, progressive row."""
        if kwargs:
            logger.debug("log_images ignores %s", sorted(kwargs))
        return image_logging.log_images_ldm(
            self, batch, N=N, n_row=n_row, sample=sample, ddim_steps=ddim_steps, ddim_eta=ddim_eta,
            return_keys=return_keys, quantize_denoised=quantize_denoised, inpaint=inpaint,
            plot_denoise_rows=plot_denoise_rows, plot_progressive_rows=plot_progressive_rows,
            plot_diffusion_rows=plot_diffusion_rows, guidance_scale=unconditional_guidance_scale)
