"""The KL autoencoder's loss: L1 + LPIPS with a learned output log-variance, a KL penalty and a patch GAN."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.adversarial import AdversarialPerceptualLoss, GANLossType, LossStep, adopt_weight
from ldm.modules.losses.lpips import PerceptualWeights
from ldm.modules.losses.vqperceptual import DummyLoss

__all__ = ["LPIPSWithDiscriminator", "DummyLoss"]


class LPIPSWithDiscriminator(AdversarialPerceptualLoss):
    """Loss of `AutoencoderKL`.

    Generator step: ``sum(rec / exp(logvar) + logvar) / N + kl_weight * KL + d_weight * disc_factor * g_loss``
    with rec = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec) per pixel. Discriminator step: hinge (or vanilla)
    loss, times disc_factor (zero before `disc_start`).

    :param perceptual_weights: ``pretrained`` (default; VGG16 from the torch hub cache) or ``random`` (tests).
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = GANLossType.HINGE,
                 disc_ndf: int = 64, perceptual_weights: str = PerceptualWeights.PRETRAINED) -> None:
        super().__init__(disc_start=disc_start, pixelloss_weight=pixelloss_weight, disc_num_layers=disc_num_layers,
                         disc_in_channels=disc_in_channels, disc_factor=disc_factor, disc_weight=disc_weight,
                         perceptual_weight=perceptual_weight, use_actnorm=use_actnorm,
                         disc_conditional=disc_conditional, disc_ndf=disc_ndf, disc_loss=disc_loss,
                         perceptual_weights=perceptual_weights)
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posteriors: DiagonalGaussianDistribution, optimizer_idx: int, global_step: int,
                last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None, split: str = "train",
                weights: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one of the two steps and its log.

        :param inputs: real images, [N x C x H x W] in [-1, 1]; `reconstructions` the same shape.
        :param posteriors: the encoder's posterior (for the KL term).
        :param optimizer_idx: 0 = autoencoder (generator) step, 1 = discriminator step (see :class:`LossStep`).
        :param last_layer: the decoder's last weight, for the adaptive GAN weight.
        :param weights: optional per-pixel weights of the NLL term (broadcastable to `inputs`).
        :return: (scalar loss, {"<split>/<term>": scalar}).
        """
        step = LossStep(optimizer_idx)
        if step is LossStep.DISCRIMINATOR:
            return self.discriminator_step(inputs, reconstructions, global_step, cond, split)

        rec_loss, _ = self.reconstruction_terms(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if self.discriminator_active(global_step) or split != "train":
            g_loss = self.generator_adversarial(reconstructions, cond)
        else:  # a training step before disc_start: the GAN term is zero, skip the discriminator (a fifth of a step)
            g_loss = torch.zeros((), device=inputs.device)
        if self.disc_factor > 0.0 and g_loss.requires_grad:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:
            d_weight = torch.zeros((), device=inputs.device)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss

        log = {f"{split}/total_loss": loss.clone().detach().mean(),
               f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach().mean(),
               f"{split}/nll_loss": nll_loss.detach().mean(),
               f"{split}/rec_loss": rec_loss.detach().mean(),
               f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(float(disc_factor), device=inputs.device),
               f"{split}/g_loss": g_loss.detach().mean()}
        return loss, log
