"""Adapting a latent diffusion model's first-stage decoder to images outside its training domain.

A trained LDM lives in the latent space of its first stage's encoder. When a fine-tuning subject lies outside the
data the autoencoder was trained on (the demo's autoencoder saw 16 emoji only), the encoder still maps it to a
latent, but the decoder renders that latent as a blur of what it knows: the UNet can learn the latent perfectly
and the samples still do not show the subject. :func:`adapt_decoder` trains the decoder (every parameter under the
names in ``DECODER_PARTS``) to reconstruct the given images from the frozen encoder's latents, so the latent space,
and with it every trained prompt of the LDM, stays where it was; the images should include some of the model's own
outputs (e.g. DreamBooth's prior-preservation samples) so that the decoder keeps rendering those as before.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from ldm.models.diffusion.first_stage import FirstStageCodec

logger = logging.getLogger(__name__)

DECODER_PARTS = ("decoder", "post_quant_conv")


def decoder_parameters(first_stage: nn.Module, parts: Sequence[str] = DECODER_PARTS) -> list[nn.Parameter]:
    """The parameters of `first_stage`'s submodules named in `parts` (a missing one is an error naming it)."""
    missing = [p for p in parts if not isinstance(getattr(first_stage, p, None), nn.Module)]
    if missing:
        raise AttributeError(f"{type(first_stage).__name__} has no submodule(s) {', '.join(missing)} to adapt "
                             f"(expected {', '.join(parts)})")
    return [p for part in parts for p in getattr(first_stage, part).parameters()]


def adapt_decoder(first_stage: nn.Module, images: torch.Tensor, steps: int, lr: float = 3e-4,
                  batch_size: int = 32, seed: int = 0, parts: Sequence[str] = DECODER_PARTS) -> list[float]:
    """Trains the decoder of `first_stage` (L1 reconstruction from latents sampled from the frozen encoder's
    posterior, Adam) on `images`; the encoder and everything not under `parts` stay bit-identical.

    :param images: [N x 3 x H x W] in [-1, 1]; each batch draws `batch_size` of them uniformly (repeat rows to
        weight them).
    :return: the loss of every step. The module is left in eval mode with ``requires_grad`` as it was.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected [N x 3 x H x W] images, got {tuple(images.shape)}")
    params = decoder_parameters(first_stage, parts)
    was_trainable = [p.requires_grad for p in first_stage.parameters()]
    for p in first_stage.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    codec = FirstStageCodec(first_stage)
    device = next(first_stage.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    nn.Module.train(first_stage, True)  # a frozen first stage has train() disabled
    losses = []
    try:
        for _ in range(steps):
            x = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)].to(device)
            with torch.no_grad():
                z = codec.latent(codec.encode(x))
            loss = (codec.decode(z) - x).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        nn.Module.train(first_stage, False)
        for p, flag in zip(first_stage.parameters(), was_trainable):
            p.requires_grad_(flag)
    if losses:
        logger.info("decoder adapted in %d steps: L1 %.4f -> %.4f", steps, losses[0], losses[-1])
    return losses
