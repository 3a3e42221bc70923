"""First-stage autoencoders (perceptual compression): `AutoencoderKL`, `VQModel`, `VQModelInterface`,
`IdentityFirstStage`.

Both trainable models are Lightning modules with manual optimisation: each training batch takes one step of the
autoencoder optimiser (encoder, decoder, quant convs, codebook) and one of the discriminator optimiser, through
the `loss` module built from `lossconfig` (see ``ldm.modules.losses``).

Differences from the original, on purpose: the discriminator step reuses the reconstruction of the autoencoder
step (detached) instead of running the autoencoder a second time; the `loss.*` keys of a standalone first-stage
checkpoint are dropped (with a log line) when the model was built without a trainable loss, e.g. inside an LDM.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import load_state_dict
from ldm.distributed import average_gradients, broadcast_
from ldm.modules.diffusionmodules.model import Decoder, Encoder, split_ddconfig
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma, ema_weights
from ldm.modules.losses.adversarial import LossStep
from ldm.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer
from ldm.util import ConfigError, instantiate_from_config

logger = logging.getLogger(__name__)

# each training batch steps both optimisers, and Lightning counts every optimiser step in `global_step`
OPTIMIZER_STEPS_PER_BATCH = 2
FIRST_STAGE_TARGETS = ("AutoencoderKL", "VQModel", "VQModelInterface")


def allow_missing_checkpoints(config: Any) -> Any:
    """A copy of a model config in which every first-stage autoencoder (at any depth, e.g. the
    ``first_stage_config`` of a LatentDiffusion) is built with ``allow_missing_ckpt: true``: a `ckpt_path` that
    does not exist then keeps the initial weights (with a warning naming it) instead of raising. Use it when the
    weights come from elsewhere, e.g. a full LatentDiffusion checkpoint loaded afterwards."""
    if isinstance(config, Mapping) or hasattr(config, "keys"):
        out = {k: allow_missing_checkpoints(v) for k, v in config.items()}
        target = str(out.get("target", ""))
        if target.rsplit(".", 1)[-1] in FIRST_STAGE_TARGETS and target.startswith("ldm.models.autoencoder."):
            out["params"] = {**(out.get("params") or {}), "allow_missing_ckpt": True}
        return out
    if isinstance(config, (list, tuple)) or (hasattr(config, "__iter__") and not isinstance(config, (str, bytes))):
        return [allow_missing_checkpoints(v) for v in config]
    return copy.copy(config)


def _drop_foreign_loss_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: a model whose `loss` holds no state ignores the `loss.*` keys of a checkpoint."""
    if any(True for _ in module.loss.state_dict()):
        return
    keys = [k for k in state_dict if k.startswith(prefix + "loss.")]
    if keys:
        logger.info("%s: ignoring %d 'loss.*' keys of the checkpoint (this model has no trainable loss)",
                    type(module).__name__, len(keys))
        for k in keys:
            del state_dict[k]


class FirstStageModel(pl.LightningModule):
    """What `AutoencoderKL` and `VQModel` share: input handling, checkpoint loading, the two-optimiser loop."""

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], image_key: str,
                 colorize_nlabels: int | None, monitor: str | None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.image_key = image_key
        enc_args, dec_args = split_ddconfig(ddconfig)
        self.encoder = Encoder(**enc_args)
        self.decoder = Decoder(**dec_args)
        self.loss = instantiate_from_config(lossconfig)
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise ConfigError(f"colorize_nlabels must be an int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.register_load_state_dict_pre_hook(_drop_foreign_loss_keys)
        self._keep_discriminator_out_of_ddp()

    @property
    def downsampling_factor(self) -> int:
        """f: how much the encoder shrinks each spatial side."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def init_from_ckpt(self, path: str | Path, ignore_keys: Sequence[str] = (), allow_missing: bool = False) -> None:
        """Loads weights from a checkpoint file (non-strict; keys starting with any of `ignore_keys` are dropped).

        :param allow_missing: a missing file keeps the initial weights (with a warning) instead of raising.
        :raises FileNotFoundError: naming `path` when it does not exist and `allow_missing` is false.
        """
        path = Path(path)
        if not path.is_file():
            if allow_missing:
                logger.warning("%s: ckpt_path %s does not exist; keeping the initial weights", type(self).__name__,
                               path)
                return
            raise FileNotFoundError(
                f"{type(self).__name__}: ckpt_path '{path}' does not exist (resolved to {path.resolve()}). Put the "
                f"first-stage checkpoint there, fix or remove `ckpt_path` in the config, or set allow_missing_ckpt: "
                f"true (ldm.models.autoencoder.allow_missing_checkpoints(config) does it for a whole config) when "
                f"the weights come from elsewhere.")
        sd = load_state_dict(path)
        for k in list(sd):
            if any(k.startswith(ik) for ik in ignore_keys):
                logger.info("deleting key %s from state_dict", k)
                del sd[k]
        missing, unexpected = self.load_state_dict(sd, strict=False)
        logger.info("restored %s from %s with %d missing and %d unexpected keys", type(self).__name__, path,
                    len(missing), len(unexpected))
        if missing:
            logger.info("missing keys: %s", missing)
        if unexpected:
            logger.info("unexpected keys: %s", unexpected)

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        """batch[k], an [N x H x W x C] (or [N x H x W]) image batch in [-1, 1] -> contiguous [N x C x H x W] in the
        model's floating dtype (float32, or float64 under Lightning's ``64-true`` precision)."""
        if k not in batch:
            raise KeyError(f"{type(self).__name__}: the batch has no key '{k}' (image_key); keys: {list(batch)}")
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format, dtype=self.dtype)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Projects a segmentation map [N x K x H x W] to a pseudo-colour image [N x 3 x H x W] in [-1, 1]."""
        if self.image_key != "segmentation":
            raise ValueError(f"to_rgb is for segmentation inputs (image_key 'segmentation'), not '{self.image_key}'")
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    # --- training -------------------------------------------------------------------------------------------------
    @property
    def batch_step(self) -> int:
        """The number of training batches done (what the original's `global_step` counted)."""
        return self.global_step // OPTIMIZER_STEPS_PER_BATCH

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of the autoencoder optimiser."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(reconstruction [N x C x H x W], regulariser output) of a training/validation batch."""
        raise NotImplementedError

    def compute_loss(self, x: torch.Tensor, xrec: torch.Tensor, reg: Any, step: LossStep,
                     split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The `loss` module's value for `step` (generator or discriminator), and its log."""
        raise NotImplementedError

    def _learning_rates(self) -> tuple[float, float]:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            raise RuntimeError(f"{type(self).__name__}.learning_rate is not set: main.py sets it from "
                               f"model.base_learning_rate; set it yourself when training without main.py")
        return lr, lr

    def configure_optimizers(self) -> Any:
        lr_g, lr_d = self._learning_rates()
        opt_ae = torch.optim.Adam(self.autoencoder_parameters(), lr=lr_g, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr_d, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    # --- training under DDP ---------------------------------------------------------------------------------------
    # A batch takes two steps, each with its own backward: the autoencoder's (which does not reach the
    # discriminator) and the discriminator's (which does not reach the autoencoder). DDP's reducer expects every
    # parameter it manages in every backward, so a whole-model DDP fails on the first step with "parameters that
    # were not used in producing the loss" (find_unused_parameters=True would make it traverse the graph and
    # all-reduce a zero gradient for the other network twice per batch). Instead the discriminator is left out of
    # DDP: DDP averages the autoencoder's gradients during its backward as usual, and the discriminator's backward
    # runs without DDP's sync (`toggle_model(sync_grad=False)`) and its gradients are averaged in one collective
    # before its step. Both steps then see the gradient of the global batch, as one process would.

    def _discriminator(self) -> nn.Module | None:
        disc = getattr(self.loss, "discriminator", None)
        return disc if isinstance(disc, nn.Module) and any(True for _ in disc.parameters()) else None

    def _keep_discriminator_out_of_ddp(self) -> None:
        """Tells DDP (when it wraps this module) to manage neither the discriminator's parameters nor its buffers."""
        disc = self._discriminator()
        if disc is None:
            return
        from torch.nn.parallel import DistributedDataParallel

        names = [f"loss.discriminator.{n}" for n, _ in (*disc.named_parameters(), *disc.named_buffers())]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def on_train_start(self) -> None:
        # DDP makes the autoencoder equal on every rank; the discriminator, outside it, starts from rank zero's too
        disc = self._discriminator()
        if disc is not None:
            broadcast_((*disc.parameters(), *disc.buffers()), src=0)

    def _optimizer_step(self, optimizer: Any, loss: torch.Tensor, parameters: Iterable[nn.Parameter] = ()) -> None:
        """zero_grad, backward, then (for `parameters` that DDP does not manage) the average over ranks, and step."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        average_gradients(parameters)
        optimizer.step()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.get_input(batch, self.image_key)
        opt_ae, opt_disc = self.optimizers()

        with opt_ae.toggle_model():
            xrec, reg = self.reconstruct(x)
            aeloss, log_ae = self.compute_loss(x, xrec, reg, LossStep.GENERATOR, "train")
            self._optimizer_step(opt_ae, aeloss)

        active = getattr(self.loss, "discriminator_active", None)
        if active is None or active(self.batch_step):
            with opt_disc.toggle_model(sync_grad=False):
                discloss, log_disc = self.compute_loss(x, xrec.detach(), reg, LossStep.DISCRIMINATOR, "train")
                self._optimizer_step(opt_disc, discloss, parameters=self.loss.discriminator.parameters())
        else:  # before disc_start its loss is zero: no work, but the step counts (max_steps is in optimiser steps)
            discloss, log_disc = torch.zeros((), device=x.device), {}
            opt_disc.zero_grad(set_to_none=True)
            opt_disc.step()

        for scheduler in self._schedulers():
            scheduler.step()
        n = len(x)
        self.log("train/aeloss", aeloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/discloss", discloss.detach(), prog_bar=True, logger=True, on_step=True, on_epoch=True,
                 batch_size=n)
        self.log_dict(log_ae, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        self.log_dict(log_disc, prog_bar=False, logger=True, on_step=True, on_epoch=False)
        return aeloss.detach()

    def _schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]

    def _validation_losses(self, batch: Mapping[str, torch.Tensor], suffix: str = "") -> dict[str, torch.Tensor]:
        x = self.get_input(batch, self.image_key)
        xrec, reg = self.reconstruct(x)
        split = "val" + suffix
        aeloss, log_ae = self.compute_loss(x, xrec, reg, LossStep.GENERATOR, split)
        _, log_disc = self.compute_loss(x, xrec, reg, LossStep.DISCRIMINATOR, split)
        rec_loss = log_ae.pop(f"{split}/rec_loss")
        self.log(f"{split}/rec_loss", rec_loss, prog_bar=True, logger=True, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=len(x))
        self.log(f"{split}/aeloss", aeloss, prog_bar=True, logger=True, on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=len(x))
        self.log_dict(log_ae, sync_dist=True, batch_size=len(x))
        self.log_dict(log_disc, sync_dist=True, batch_size=len(x))
        return {f"{split}/rec_loss": rec_loss, **log_ae, **log_disc}

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._validation_losses(batch)

    def _colorized(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        if xs[0].shape[1] > 3:
            return [self.to_rgb(x) for x in xs]
        return list(xs)


class AutoencoderKL(FirstStageModel):
    """KL-regularised autoencoder: x [N x 3 x H x W] -> posterior over z [N x embed_dim x H/f x W/f] -> x_rec.

    :param ddconfig: the Encoder/Decoder settings (must have `double_z: true`).
    :param lossconfig: the loss (``ldm.modules.losses.LPIPSWithDiscriminator``; ``torch.nn.Identity`` inside an LDM).
    :param embed_dim: latent channels.
    :param ckpt_path: weights to load.
    :param allow_missing_ckpt: a `ckpt_path` that does not exist keeps the initial weights (with a warning)
        instead of raising FileNotFoundError.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None,
                 allow_missing_ckpt: bool = False) -> None:
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        if not ddconfig.get("double_z", True):
            raise ConfigError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and log-variance)")
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, allow_missing=allow_missing_ckpt)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x [N x C x H x W] -> the posterior over z, [N x embed_dim x H/f x W/f]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [N x embed_dim x h x w] -> image [N x out_ch x h*f x w*f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input: torch.Tensor, sample_posterior: bool = True
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction [N x C x H x W], posterior); z is sampled, or the mean when not `sample_posterior`."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quant_conv.parameters(),
                *self.post_quant_conv.parameters()]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        return self(x)

    def compute_loss(self, x: torch.Tensor, xrec: torch.Tensor, reg: DiagonalGaussianDistribution, step: LossStep,
                     split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(x, xrec, reg, int(step), self.batch_step, last_layer=self.get_last_layer(), split=split)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, torch.Tensor], only_inputs: bool = False,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions", "samples" (decoded N(0, I) latents)}, each [N x 3 x H x W] in about [-1, 1]."""
        log = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            log["samples"] = self.decode(torch.randn_like(posterior.sample()))
            x, xrec = self._colorized(x, xrec)
            log["reconstructions"] = xrec
        log["inputs"] = x
        return log


class VQAutoencoder(FirstStageModel):
    """VQ-regularised autoencoder: x -> z [N x embed_dim x H/f x W/f] -> nearest of `n_embed` codes -> x_rec.

    The network, its training and its checkpoint names; two siblings give it a public ``encode``/``decode``:
    :class:`VQModel` (stage one: quantised codes) and :class:`VQModelInterface` (as a latent diffusion model uses
    it: continuous latents, quantised when decoding).

    :param n_embed: codebook size; :param embed_dim: code dimension (latent channels).
    :param remap, sane_index_shape: see :class:`~ldm.modules.vqvae.quantize.VectorQuantizer2` (beta is 0.25).
    :param batch_resize_range: (low, high): resize each training batch to a random multiple of 16 in that range.
    :param scheduler_config: a scheduler with a `schedule(step)` method (e.g.
        ``ldm.lr_scheduler.LambdaLinearScheduler``) applied to both optimisers per batch.
    :param lr_g_factor: the autoencoder's learning rate is `lr_g_factor * learning_rate`.
    :param use_ema: keep an EMA of the weights (`model_ema`), used for validation (`val_ema/*`).
    :param allow_missing_ckpt: a `ckpt_path` that does not exist keeps the initial weights (with a warning)
        instead of raising FileNotFoundError.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: int, embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None,
                 batch_resize_range: Sequence[int] | None = None, scheduler_config: Mapping[str, Any] | None = None,
                 lr_g_factor: float = 1.0, remap: str | None = None, sane_index_shape: bool = False,
                 use_ema: bool = False, allow_missing_ckpt: bool = False) -> None:
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor)
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if batch_resize_range is not None:
            logger.info("%s: using per-batch resizing in range %s", type(self).__name__, batch_resize_range)
        self.batch_resize_range = batch_resize_range
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self)
            logger.info("keeping EMAs of %d buffers", len(list(self.model_ema.buffers())))
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, allow_missing=allow_missing_ckpt)
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor

    def ema_scope(self, context: str | None = None) -> contextlib.AbstractContextManager:
        """Within this context the model runs on its EMA weights (if `use_ema`)."""
        return ema_weights(self.model_ema, self, context) if self.use_ema else contextlib.nullcontext()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """x [N x C x H x W] -> the continuous latents h [N x embed_dim x H/f x W/f] before quantisation."""
        return self.quant_conv(self.encoder(x))

    def encode_to_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """x -> (quantised latents [N x embed_dim x H/f x W/f], codebook loss, (None, None, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    def decode_quantized(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents [N x embed_dim x h x w] -> image [N x out_ch x h*f x w*f]."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Codebook indices [N x h x w] -> image [N x out_ch x h*f x w*f]."""
        n, h, w = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), (n, h, w, self.embed_dim))
        return self.decode_quantized(quant)

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple:
        """(reconstruction [N x C x H x W], codebook loss[, indices])."""
        quant, diff, (_, _, ind) = self.encode_to_codes(input)
        dec = self.decode_quantized(quant)
        if return_pred_indices:
            return dec, diff, ind
        return dec, diff

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        x = super().get_input(batch, k)
        if self.batch_resize_range is None or not self.training:
            return x
        lower, upper = self.batch_resize_range
        if self.batch_step <= 4:  # the first batches at the largest size, to fail early on memory
            new_size = upper
        else:
            sizes = torch.arange(lower, upper + 16, 16)
            new_size = int(sizes[torch.randint(len(sizes), (1,))])
        if new_size != x.shape[2]:
            x = F.interpolate(x, size=new_size, mode="bicubic")
        return x.detach()

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantize.parameters(),
                *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        xrec, qloss, ind = self(x, return_pred_indices=True)
        return xrec, (qloss, ind)

    def compute_loss(self, x: torch.Tensor, xrec: torch.Tensor, reg: tuple[torch.Tensor, torch.Tensor],
                     step: LossStep, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        qloss, ind = reg
        if step is LossStep.GENERATOR:
            return self.loss(qloss, x, xrec, int(step), self.batch_step, last_layer=self.get_last_layer(),
                             split=split, predicted_indices=ind)
        return self.loss(qloss, x, xrec, int(step), self.batch_step, last_layer=self.get_last_layer(), split=split)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        log = self._validation_losses(batch)
        if self.use_ema:
            with self.ema_scope():
                self._validation_losses(batch, suffix="_ema")
        return log

    def _learning_rates(self) -> tuple[float, float]:
        lr, _ = super()._learning_rates()
        return self.lr_g_factor * lr, lr

    def configure_optimizers(self) -> Any:
        opt_ae, opt_disc = super().configure_optimizers()
        if self.scheduler_config is None:
            return [opt_ae, opt_disc]
        schedule = instantiate_from_config(self.scheduler_config).schedule
        logger.info("setting up LambdaLR schedulers")
        schedulers = [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule),
                       "interval": "step", "frequency": 1} for opt in (opt_ae, opt_disc)]
        return [opt_ae, opt_disc], schedulers

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, torch.Tensor], only_inputs: bool = False, plot_ema: bool = False,
                   **kwargs: Any) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions"[, "reconstructions_ema"]}, each [N x 3 x H x W] in about [-1, 1]."""
        x = self.get_input(batch, self.image_key).to(self.device)
        if only_inputs:
            return {"inputs": x}
        xrec, _ = self(x)
        log = {}
        if plot_ema and self.use_ema:
            with self.ema_scope():
                xrec_ema, _ = self(x)
            (log["reconstructions_ema"],) = self._colorized(xrec_ema)
        log["inputs"], log["reconstructions"] = self._colorized(x, xrec)
        return log


class VQModel(VQAutoencoder):
    """The VQ autoencoder of stage one: `encode` gives the quantised codes, `decode` decodes quantised latents."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """x -> (quantised latents [N x embed_dim x H/f x W/f], codebook loss, (None, None, indices))."""
        return self.encode_to_codes(x)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents [N x embed_dim x h x w] -> image [N x out_ch x h*f x w*f]."""
        return self.decode_quantized(quant)


class VQModelInterface(VQAutoencoder):
    """The VQ first stage as a latent diffusion model uses it: `encode` gives the continuous pre-quantisation
    latents, and `decode` quantises them (unless `force_not_quantize`) before decoding. Same weights and
    checkpoint names as :class:`VQModel`."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [N x C x H x W] -> h [N x embed_dim x H/f x W/f] (not quantised)."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """h [N x embed_dim x h x w] -> image; h goes through the codebook first unless `force_not_quantize`."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decode_quantized(quant)


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (diffusion directly in pixel space): encode, decode and quantize are identity.

    :param vq_interface: `quantize` returns ``(x, None, [None, None, None])`` like a VQ model instead of ``x``.
    """

    def __init__(self, vq_interface: bool = False) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
