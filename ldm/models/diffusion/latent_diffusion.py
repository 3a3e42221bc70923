"""LatentDiffusion: a DDPM on ``scale_factor * E(x)`` conditioned on ``tau(y)`` (Rombach et al. 2022, 3.2-3.3).

Configs name it ``ldm.models.diffusion.ddpm.LatentDiffusion``; it is re-exported there. It wires the frozen
first stage (through its :class:`~ldm.models.diffusion.first_stage.FirstStageCodec`), the conditioner (through
the :class:`~ldm.models.diffusion.conditioning.ConditionBuilder`) and the shared diffusion module; the notebook
API keeps the original's signatures.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.data import latent_cache
from ldm.data.layout import LayoutTokenizer
from ldm.data.layout_json import read_class_names
from ldm.distributed import broadcast_, global_mean_std, is_distributed
from ldm.models.diffusion import image_logging
from ldm.finetune.recipe import check_trainable_conditioner
from ldm.models.diffusion.base import DiffusionModule
from ldm.models.diffusion.conditioning import (LAYOUT_COND_KEY, ConditionBuilder, batch_tensor,
                                               resolve_conditioning_key, slice_cond)
from ldm.models.diffusion.first_stage import FirstStageCodec, freeze, mode_of
from ldm.models.diffusion.guidance import ConditioningAtStep, Guider, make_guider
from ldm.models.diffusion.sampling import SamplerKind, SamplingOptions, sample
from ldm.modules.tiling import SplitInputParams
from ldm.util import default, instantiate_from_config

logger = logging.getLogger(__name__)


class LatentDiffusion(DiffusionModule):
    """Diffusion in the latent space of a frozen first stage, with an optional conditioning stage.

    :param first_stage_config: the autoencoder (frozen).
    :param cond_stage_config: the conditioner, or ``__is_first_stage__`` / ``__is_unconditional__``.
    :param num_timesteps_cond: with > 1, the conditioning is itself noised on a short schedule in training (legacy).
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
    :param split_input_params: patch-wise first-stage encoding and decoding (the original's dict: ``ks``,
        ``stride``, ``vqf``, ``patch_distributed_vq``, the ``clip_*`` weights, ``tie_braker``; see
        :class:`~ldm.modules.tiling.SplitInputParams`). It may also be assigned (or edited) later, as the original
        notebooks do (``model.split_input_params = {...}``): it is read at every encode and decode.
    :param layout_tokenizer: for ``cond_stage_key: coordinates_bbox``: the :class:`~ldm.data.layout.LayoutTokenizer`
        arguments of the data (``num_classes``, ``vocab_size``, ``max_objects``, ``encode_crop``,
        ``use_group_flag``) and optionally ``class_names`` (a list or a text file), used for the null layout of
        guidance and dropout and to draw layouts in ``log_images``. Default (as the zoo configs): read from the
        conditioner's ``vocab_size`` and ``max_seq_len``, with class ids drawn as numbers.
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
                 split_input_params: Mapping[str, Any] | None = None,
                 layout_tokenizer: Mapping[str, Any] | None = None,
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
        self.scale_by_std = scale_by_std
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.split_input_params = split_input_params
        self.split_input_tiles()  # a malformed dict fails here, naming its key
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.layout_tokenizer, self.layout_class_names = layout_tokenizer_of(cond_stage_key, layout_tokenizer,
                                                                             cond_stage_config)
        self.conditions = ConditionBuilder(cond_stage_key, self.first_stage_key, self.cond_stage_model, ucg_rate,
                                           ucg_null_label, concat_mask_key, self.layout_tokenizer)
        self.clip_denoised = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet)
        self.setup_finetuning()

    finishes_setup_in_subclass = True  # the fine-tuning sections may name the conditioner

    def check_recipe(self) -> None:
        check_trainable_conditioner(self, "cond_stage_model.", self.cond_stage_trainable)

    # -- construction -----------------------------------------------------------------------------------------
    def make_cond_schedule(self) -> None:
        """``cond_ids``: the conditioning noise step of each diffusion step (legacy num_timesteps_cond > 1)."""
        self.cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        self.cond_ids[:self.num_timesteps_cond] = ids

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        self.first_stage_model = freeze(instantiate_from_config(config))
        self.first_stage_codec = FirstStageCodec(self.first_stage_model, tiling=self.split_input_tiles)

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
            self.cond_stage_model = freeze(instantiate_from_config(config))

    @property
    def conditional(self) -> bool:
        """Whether the network takes a conditioning (``conditioning_key`` is not None)."""
        return self.model.conditioning_key is not None

    # -- scale_by_std ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """On the very first batch of a fresh run, sets ``scale_factor = 1 / std(z)`` (``scale_by_std``)."""
        fresh = self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
        if not (self.scale_by_std and fresh and not self.restarted_from_ckpt):
            return
        z = self.first_stage_codec.latent(self.encode_batch(batch, self.first_stage_key)[1]).detach()
        # the std of the global batch (all ranks' latents), then rank zero's value everywhere: the same on every rank
        scale = 1.0 / global_mean_std(z.float())[1] if is_distributed() else 1.0 / z.flatten().float().std()
        broadcast_([scale], src=0)
        self.scale_factor = scale.to(self.scale_factor)
        logger.info("scale_by_std: set scale_factor to %.6f", float(self.scale_factor))

    # -- first stage ------------------------------------------------------------------------------------------
    def split_input_tiles(self) -> SplitInputParams | None:
        """The parsed ``split_input_params`` as they are now (None: whole-image first-stage calls).

        :raises ValueError: naming the offending ``split_input_params.<key>``.
        """
        params = self.split_input_params
        return None if params is None else SplitInputParams.from_config(params)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """The scaled latent ``scale_factor * z`` ([N x C x h x w]) of a first-stage encoding."""
        return self.scale_factor * self.first_stage_codec.latent(encoder_posterior)

    @torch.no_grad()
    def encode_batch(self, batch: Mapping[str, Any], k: str,
                     bs: int | None = None) -> tuple[torch.Tensor | None, Any]:
        """The images [N x C x H x W] of ``batch[k]`` and their first-stage encoding; a batch from a latent cache
        (scripts/cache_latents.py) carries the encoding itself, and no images (None)."""
        cached = latent_cache.cached_encoding(batch, self.first_stage_model, self.device, bs)
        if cached is not None:
            return None, cached
        x = batch_tensor(batch, k)[:bs].to(self.device)
        return x, self.encode_first_stage(x)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """``first_stage_model.encode`` of [N x 3 x H x W] images in [-1, 1] (a tensor or a distribution)."""
        return self.first_stage_codec.encode(x)

    def differentiable_decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                                          force_not_quantize: bool = False) -> torch.Tensor:
        """Images [N x 3 x H x W] from scaled latents [N x C x h x w] (or codebook ids with `predict_cids`)."""
        if predict_cids:
            z = self.first_stage_codec.codebook_latents(z)
        return self.first_stage_codec.decode(z / self.scale_factor, predict_cids or force_not_quantize)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        return self.differentiable_decode_first_stage(z, predict_cids, force_not_quantize)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        return self.decode_first_stage(samples)

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
            return mode_of(self.cond_stage_model.encode(c))
        return self.cond_stage_model(c)

    @property
    def null_label(self) -> int | None:
        """The null class of classifier-free guidance: ``ucg_null_label`` or the embedder's ``n_classes - 1``."""
        return self.conditions.null_label

    def get_unconditional_conditioning(self, batch_size: int, like: Any = None) -> Any:
        """The encoded null condition of `batch_size` examples (empty captions, the null class, or zeros like
        the raw conditioning `like`); None for unconditional models."""
        if not self.conditional:
            return None
        return self.get_learned_conditioning(self.conditions.null(batch_size, like, self.device))

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
        if self.conditional:
            xc = self.conditions.raw(batch, x, self.device, cond_key)
            if cond_dropout:
                xc = self.conditions.drop(xc, self.device)
            c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
            if bs is not None and not isinstance(c, Mapping):
                c = slice_cond(c, bs)
            mask = self.conditions.mask_channel(batch, z)
            if mask is not None:
                c = torch.cat([c, mask], dim=1)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def sampling_conditions(self, n: int, batch: Mapping[str, Any] | None,
                            guidance_scale: float) -> tuple[Any, Any]:
        if not self.conditional:
            return None, None
        if batch is None:
            raise ValueError(f"{type(self).__name__} is conditional ({self.model.conditioning_key}): sampling needs "
                             f"a batch whose '{self.cond_stage_key}' conditions the samples")
        _, cond, xc = self.get_input(batch, self.first_stage_key, force_c_encode=True, return_original_cond=True,
                                     bs=n)
        uncond = self.get_unconditional_conditioning(n, like=xc) if guidance_scale != 1.0 else None
        return cond, uncond

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
        if self.conditional:
            if c is None:
                raise ValueError(f"conditioning_key is '{self.model.conditioning_key}' but no conditioning given")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            c = self.noised_cond(c, t)
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss for latents [N x C x h x w] at [N] steps `t` given the (encoded) conditioning."""
        return self.diffusion_loss(x_start, cond, t, noise)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            logger.info("%s: also optimizing conditioner params", type(self).__name__)
            params.extend(p for p in self.cond_stage_model.parameters() if p.requires_grad)
        return params

    # -- sampling (notebook API) ----------------------------------------------------------------------------
    def p_mean_variance(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool,
                        quantize_denoised: bool = False, return_x0: bool = False, score_corrector: Any = None,
                        corrector_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, ...]:
        """p(x_{t-1} | x_t, c): (mean, variance, log-variance[, predicted x0])."""
        guider = make_guider(self, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        out = self.posterior_step(x, t, c, clip_denoised, quantize_denoised, guider)
        return out if return_x0 else out[:3]

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool = False,
                 repeat_noise: bool = False, quantize_denoised: bool = False, return_x0: bool = False,
                 temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                 corrector_kwargs: Mapping[str, Any] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ([N x C x h x w]); with `return_x0` also the predicted x0."""
        mean, _, log_var, x0 = self.p_mean_variance(x, c, t, clip_denoised, quantize_denoised, True,
                                                    score_corrector, corrector_kwargs)
        img = self.posterior_sample(mean, log_var, t, repeat_noise, temperature, noise_dropout)
        return (img, x0) if return_x0 else img

    def ancestral_guider(self, score_corrector: Any = None,
                         corrector_kwargs: Mapping[str, Any] | None = None) -> Guider:
        """The guider of the original's ancestral loops: its score corrector, and with ``num_timesteps_cond > 1``
        the conditioning noised at each step (as in training)."""
        guider = make_guider(self, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        return ConditioningAtStep(self.noised_cond, guider) if self.shorten_cond_schedule else guider

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
        result = self.ancestral(slice_cond(cond, shape[0]), shape, steps=start_T, x_T=x_T, mask=mask, x0=x0,
                                quantize_denoised=quantize_denoised, temperature=temperature,
                                noise_dropout=noise_dropout, log_every_t=log_every_t, verbose=verbose,
                                callback=_legacy_callback(callback, img_callback),
                                guider=self.ancestral_guider(score_corrector, corrector_kwargs))
        return result.samples, result.pred_x0[1:]

    def p_sample_loop(self, cond: Any, shape: Sequence[int], return_intermediates: bool = False,
                      x_T: torch.Tensor | None = None, verbose: bool = True,
                      callback: Callable[[int], None] | None = None, timesteps: int | None = None,
                      quantize_denoised: bool = False, mask: torch.Tensor | None = None,
                      x0: torch.Tensor | None = None, img_callback: Callable[[torch.Tensor, int], None] | None = None,
                      start_T: int | None = None, log_every_t: int | None = None) -> Any:
        """Ancestral sampling of latents of `shape` ([N, C, h, w]); returns x_0 (and the x_t every few steps)."""
        steps = min(timesteps or self.num_timesteps, start_T or self.num_timesteps)
        result = self.ancestral(cond, shape, steps=steps, x_T=x_T, mask=mask, x0=x0,
                                quantize_denoised=quantize_denoised, log_every_t=log_every_t, verbose=verbose,
                                callback=_legacy_callback(callback, img_callback), guider=self.ancestral_guider())
        return (result.samples, result.x_inter) if return_intermediates else result.samples

    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: torch.Tensor | None = None, verbose: bool = True, timesteps: int | None = None,
               quantize_denoised: bool = False, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               shape: Sequence[int] | None = None) -> Any:
        """Ancestral samples of ``batch_size`` latents [N x channels x image_size x image_size]."""
        shape = default(shape, self.latent_shape(batch_size))
        return self.p_sample_loop(slice_cond(cond, batch_size), shape, return_intermediates=return_intermediates,
                                  x_T=x_T, verbose=verbose, timesteps=timesteps,
                                  quantize_denoised=quantize_denoised, mask=mask, x0=x0)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int | None,
                   **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Latent samples with DDIM in `ddim_steps` steps (intermediates as a dict), else ancestrally (a list).

        :param kwargs: ``eta``, ``x0``, ``mask``, ``quantize_denoised``, ``unconditional_guidance_scale``,
            ``unconditional_conditioning`` (and ``x_T``).
        """
        scale = kwargs.pop("unconditional_guidance_scale", 1.0)
        uncond = kwargs.pop("unconditional_conditioning", None)
        x0, mask, x_T = kwargs.pop("x0", None), kwargs.pop("mask", None), kwargs.pop("x_T", None)
        if ddim:
            options = SamplingOptions(sampler=SamplerKind.DDIM, steps=ddim_steps, eta=kwargs.pop("eta", 0.0),
                                      quantize_denoised=kwargs.pop("quantize_denoised", False))
        else:
            kwargs.pop("eta", None)
            options = SamplingOptions(sampler=SamplerKind.DDPM, steps=self.num_timesteps, log_every_t=self.log_every_t,
                                      quantize_denoised=kwargs.pop("quantize_denoised", False))
        if kwargs:
            raise TypeError(f"sample_log got unexpected arguments {sorted(kwargs)}")
        result = sample(self, self.latent_shape(batch_size), cond, uncond=uncond, scale=scale, options=options,
                        x_T=x_T, mask=mask, x0=x0)
        return result.samples, (result.intermediates if ddim else result.x_inter)

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
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        if self.conditional:
            log.update(image_logging.conditioning_images(xc, c, (x.shape[2], x.shape[3]), self.conditioning_decoder()))
        if self.layout_tokenizer is not None:
            log["conditioning"] = image_logging.layout_images(xc[:N], self.layout_tokenizer, (x.shape[2], x.shape[3]),
                                                              self.layout_class_names).to(x)
        if plot_diffusion_rows:
            row = image_logging.diffusion_row(self.q_sample, z[:n_row], self.num_timesteps, self.log_every_t)
            log["diffusion_row"] = image_logging.rows_grid([self.decode_first_stage(zt) for zt in row])
        if sample:
            ddim = dict(ddim=ddim_steps is not None, ddim_steps=ddim_steps, eta=ddim_eta)
            with self.ema_scope("Plotting"):
                samples, z_denoise_row = self.sample_log(c, N, **ddim)
            log["samples"] = self.decode_first_stage(samples)
            if self.layout_tokenizer is not None:  # the layout drawn over the samples it conditioned
                log["samples_layout"] = image_logging.layout_images(
                    xc[:N], self.layout_tokenizer, (x.shape[2], x.shape[3]), self.layout_class_names,
                    images=log["samples"])
            if plot_denoise_rows:
                log["denoise_row"] = image_logging.intermediates_grid(z_denoise_row, self.decode_first_stage)
            variants = {}
            if unconditional_guidance_scale != 1.0 and self.conditional:
                variants[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = dict(
                    unconditional_guidance_scale=unconditional_guidance_scale,
                    unconditional_conditioning=self.get_unconditional_conditioning(N, like=xc))
            if quantize_denoised and callable(getattr(self.first_stage_model, "quantize", None)):
                variants["samples_x0_quantized"] = dict(quantize_denoised=True)
            if inpaint:
                masks = image_logging.inpainting_masks(N, z.shape[2], z.shape[3], z.device)
                log["mask"] = masks["samples_inpainting"]
                variants.update({name: dict(x0=z[:N], mask=m) for name, m in masks.items()})
            for name, extra in variants.items():
                with self.ema_scope(f"Plotting {name}"):
                    log[name] = self.decode_first_stage(self.sample_log(c, N, **ddim, **extra)[0])
        if plot_progressive_rows:
            with self.ema_scope("Plotting Progressives"):
                _, progressives = self.progressive_denoising(c, shape=self.latent_shape(N)[1:], batch_size=N,
                                                             verbose=False)
            log["progressive_row"] = image_logging.intermediates_grid(progressives, self.decode_first_stage)
        return image_logging.select(log, return_keys)

    def conditioning_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Turns an encoded conditioning back into an image, for conditioners that decode (a first stage); the
        mask channel of inpainting conditionings is left out."""
        if not callable(getattr(self.cond_stage_model, "decode", None)):
            return None
        drop_mask = self.conditions.concat_mask_key is not None
        return lambda c: self.cond_stage_model.decode(c[:, :-1] if drop_mask else c)


def layout_tokenizer_of(cond_stage_key: str, spec: Mapping[str, Any] | None,
                        cond_stage_config: Mapping[str, Any] | str) -> tuple[LayoutTokenizer | None, list[str] | None]:
    """The layout tokenizer and class names of a ``coordinates_bbox`` model (see LatentDiffusion's
    ``layout_tokenizer``); (None, None) for other conditionings."""
    if cond_stage_key != LAYOUT_COND_KEY:
        if spec is not None:
            raise ValueError(f"layout_tokenizer is given but cond_stage_key is '{cond_stage_key}', not "
                             f"'{LAYOUT_COND_KEY}'")
        return None, None
    if spec is not None:
        params = dict(spec)
        names = read_class_names(params.pop("class_names", None))
        try:
            tokenizer = LayoutTokenizer(**params)
        except TypeError as e:
            raise ValueError(f"layout_tokenizer: {e}") from None
        if names is not None and len(names) != tokenizer.num_classes:
            raise ValueError(f"layout_tokenizer.class_names has {len(names)} names for num_classes="
                             f"{tokenizer.num_classes}")
        return tokenizer, names
    params = {} if isinstance(cond_stage_config, str) else dict(cond_stage_config.get("params") or {})
    if "vocab_size" not in params or "max_seq_len" not in params:
        raise ValueError(f"cond_stage_key '{LAYOUT_COND_KEY}': set layout_tokenizer (num_classes, vocab_size, "
                         f"max_objects, ...) or use a conditioner with vocab_size and max_seq_len")
    vocab, seq_len = int(params["vocab_size"]), int(params["max_seq_len"])
    # the classes are unknown here: every non-padding token below the grid may be a class id, drawn as a number
    return LayoutTokenizer(vocab - 1, vocab_size=vocab, max_objects=seq_len // 3, encode_crop=seq_len % 3 == 2,
                           use_group_flag=False), None


def _legacy_callback(callback: Callable[[int], None] | None,
                     img_callback: Callable[[torch.Tensor, int], None] | None) -> Callable[[dict], None]:
    """The one path's step callback calling the original's ``callback(i)`` and ``img_callback(x_t, i)``."""
    def report(step: dict) -> None:
        t = int(step["t"][0])
        if callback is not None:
            callback(t)
        if img_callback is not None:
            img_callback(step["x"], t)
    return report
