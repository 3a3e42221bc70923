"""The VQ autoencoder's loss: L1 (or L2) + LPIPS + the codebook loss + a patch GAN.

Also home of the helpers that taming-transformers' `vqperceptual` module exported (`hinge_d_loss`,
`vanilla_d_loss`, `adopt_weight`, `DummyLoss`), so legacy `taming.modules.losses.vqperceptual.*` targets resolve here.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.losses.adversarial import (AdversarialPerceptualLoss, GANLossType, LossStep, adopt_weight,
                                            hinge_d_loss, vanilla_d_loss)
from ldm.modules.losses.lpips import PerceptualWeights
from ldm.util import parse_enum

__all__ = ["VQLPIPSWithDiscriminator", "DummyLoss", "hinge_d_loss", "vanilla_d_loss", "adopt_weight",
           "hinge_d_loss_with_exemplar_weights", "measure_perplexity", "l1", "l2"]


class DummyLoss(nn.Module):
    """A loss placeholder without parameters (for first stages that are never trained)."""


class PixelLoss(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.abs(x - y)


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.pow(x - y, 2)


def hinge_d_loss_with_exemplar_weights(logits_real: torch.Tensor, logits_fake: torch.Tensor,
                                       weights: torch.Tensor) -> torch.Tensor:
    """Hinge loss with per-example weights [N] on [N x 1 x h x w] logits."""
    if not weights.shape[0] == logits_real.shape[0] == logits_fake.shape[0]:
        raise ValueError("weights and logits need the same batch size")
    loss_real = torch.mean(F.relu(1.0 - logits_real), dim=[1, 2, 3])
    loss_fake = torch.mean(F.relu(1.0 + logits_fake), dim=[1, 2, 3])
    loss_real = (weights * loss_real).sum() / weights.sum()
    loss_fake = (weights * loss_fake).sum() / weights.sum()
    return 0.5 * (loss_real + loss_fake)


def measure_perplexity(predicted_indices: torch.Tensor, n_embed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perplexity of the code usage, number of codes used); perplexity == n_embed when all are used equally."""
    encodings = F.one_hot(predicted_indices.long(), n_embed).float().reshape(-1, n_embed)
    avg_probs = encodings.mean(0)
    perplexity = (-(avg_probs * torch.log(avg_probs + 1e-10)).sum()).exp()
    cluster_use = torch.sum(avg_probs > 0)
    return perplexity, cluster_use


class VQLPIPSWithDiscriminator(AdversarialPerceptualLoss):
    """Loss of `VQModel`.

    Generator step: ``mean(rec) + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss`` with
    rec = pixel + perceptual_weight * LPIPS. Discriminator step as in :class:`LPIPSWithDiscriminator`.

    :param n_classes: codebook size; when set, the perplexity and cluster usage of the predicted indices are logged.
    :param perceptual_loss: only ``lpips`` (the original also named "clips" and "dists" but never implemented them).
    :param perceptual_weights: ``pretrained`` (default; VGG16 from the torch hub cache) or ``random`` (tests).
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = GANLossType.HINGE,
                 n_classes: int | None = None, perceptual_loss: str = "lpips", pixel_loss: str = PixelLoss.L1,
                 perceptual_weights: str = PerceptualWeights.PRETRAINED) -> None:
        if perceptual_loss != "lpips":
            raise ValueError(f"unknown perceptual_loss '{perceptual_loss}'; only 'lpips' is implemented")
        pixel = parse_enum(PixelLoss, pixel_loss, "pixel_loss")
        super().__init__(disc_start=disc_start, pixelloss_weight=pixelloss_weight, disc_num_layers=disc_num_layers,
                         disc_in_channels=disc_in_channels, disc_factor=disc_factor, disc_weight=disc_weight,
                         perceptual_weight=perceptual_weight, use_actnorm=use_actnorm,
                         disc_conditional=disc_conditional, disc_ndf=disc_ndf, disc_loss=disc_loss,
                         perceptual_weights=perceptual_weights)
        self.codebook_weight = codebook_weight
        self.n_classes = n_classes
        self.pixel_loss_type = pixel

    def pixel_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return l1(inputs, reconstructions) if self.pixel_loss_type is PixelLoss.L1 else l2(inputs, reconstructions)

    def forward(self, codebook_loss: torch.Tensor | None, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train",
                predicted_indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one of the two steps and its log.

        :param codebook_loss: the quantiser's scalar loss (None counts as 0).
        :param inputs: real images, [N x C x H x W] in [-1, 1]; `reconstructions` the same shape.
        :param optimizer_idx: 0 = autoencoder (generator) step, 1 = discriminator step (see :class:`LossStep`).
        :param predicted_indices: codebook indices, for the perplexity log (needs `n_classes`).
        :return: (scalar loss, {"<split>/<term>": scalar}).
        """
        step = LossStep(optimizer_idx)
        if step is LossStep.DISCRIMINATOR:
            return self.discriminator_step(inputs, reconstructions, global_step, cond, split)
        if codebook_loss is None:
            codebook_loss = torch.zeros(1, device=inputs.device)

        rec_loss, p_loss = self.reconstruction_terms(inputs, reconstructions)
        nll_loss = torch.mean(rec_loss)
        g_loss = self.generator_adversarial(reconstructions, cond)
        d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()

        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/quant_loss": codebook_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/p_loss": p_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
               f"{split}/g_loss": g_loss.detach().mean()}
        if predicted_indices is not None and self.n_classes is not None:
            with torch.no_grad():
                perplexity, cluster_usage = measure_perplexity(predicted_indices, self.n_classes)
            log[f"{split}/perplexity"] = perplexity
            log[f"{split}/cluster_usage"] = cluster_usage
        return loss, log
