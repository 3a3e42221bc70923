"""What the KL and VQ first-stage losses share: LPIPS + a patch discriminator with an adaptive weight.

The generator objective is ``rec + reg + d_weight * disc_factor * g_loss`` with
``d_weight = disc_weight * ||grad_L nll|| / (||grad_L g_loss|| + 1e-4)`` at the decoder's last layer L
(Esser et al., "Taming Transformers", eq. 7), and ``disc_factor`` zero before `disc_start` steps.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from ldm.distributed import all_reduce_mean_, is_distributed
from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.modules.losses.lpips import LPIPS, PerceptualWeights
from ldm.util import parse_enum


class LossStep(enum.IntEnum):
    """Which of the two optimisers a loss call is for (the original's `optimizer_idx`)."""

    GENERATOR = 0  # encoder, decoder (and codebook)
    DISCRIMINATOR = 1


class GANLossType(str, enum.Enum):
    HINGE = "hinge"
    VANILLA = "vanilla"

    @classmethod
    def parse(cls, value: str | GANLossType) -> GANLossType:
        return parse_enum(cls, value, "disc_loss")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_rec))): the non-saturating GAN loss."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


D_LOSSES = {GANLossType.HINGE: hinge_d_loss, GANLossType.VANILLA: vanilla_d_loss}


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` while `global_step < threshold`, then `weight`."""
    return value if global_step < threshold else weight


class AdversarialPerceptualLoss(nn.Module):
    """Base of `LPIPSWithDiscriminator` and `VQLPIPSWithDiscriminator` (submodules `perceptual_loss`,
    `discriminator`, as in the original; `perceptual_loss` is None when `perceptual_weight` is 0)."""

    def __init__(self, disc_start: int, pixelloss_weight: float, disc_num_layers: int, disc_in_channels: int,
                 disc_factor: float, disc_weight: float, perceptual_weight: float, use_actnorm: bool,
                 disc_conditional: bool, disc_ndf: int, disc_loss: str | GANLossType,
                 perceptual_weights: str | PerceptualWeights) -> None:
        super().__init__()
        self.pixel_weight = pixelloss_weight
        # without a perceptual term there is no LPIPS network (and no VGG16 to load or to store in checkpoints)
        self.perceptual_loss = LPIPS(weights=perceptual_weights) if perceptual_weight > 0 else None
        self.perceptual_weight = perceptual_weight
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm, ndf=disc_ndf).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss_type = GANLossType.parse(disc_loss)
        self.disc_loss = D_LOSSES[self.disc_loss_type]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms count at `global_step`: from `disc_start` on, when `disc_factor` > 0. Before,
        they are multiplied by zero, so the discriminator's work can be skipped."""
        return adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start) > 0.0

    def pixel_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1, [N x C x H x W]."""
        return torch.abs(inputs - reconstructions)

    def reconstruction_terms(self, inputs: torch.Tensor, reconstructions: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rec_loss [N x C x H x W] = pixel + perceptual_weight * LPIPS, p_loss [N x 1 x 1 x 1])."""
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        rec_loss = self.pixel_weight * self.pixel_loss(inputs, reconstructions)
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        else:
            p_loss = torch.zeros((), device=inputs.device, dtype=inputs.dtype)
        return rec_loss, p_loss

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor | None) -> torch.Tensor:
        """disc_weight * ||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped to [0, 1e4].

        With several processes both gradients are averaged over the ranks first (every rank computes the same
        weight, the one a single process would compute for the global batch). Zero (no gradient available) when there is no last layer or no graph, e.g. in validation.
        """
        if last_layer is None or not (nll_loss.requires_grad and g_loss.requires_grad):
            return torch.zeros((), device=nll_loss.device)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        if is_distributed():  # the gradients of the global batch, so the weight is the same at any world size
            nll_grads, g_grads = all_reduce_mean_(torch.stack([nll_grads, g_grads]))
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("this loss has disc_conditional=True: pass `cond`")
            return self.discriminator(x.contiguous())
        if not self.disc_conditional:
            raise ValueError("`cond` was given but this loss has disc_conditional=False")
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def generator_adversarial(self, reconstructions: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """g_loss = -mean D(x_rec) (scalar)."""
        return -torch.mean(self._discriminate(reconstructions, cond))

    def discriminator_step(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: torch.Tensor | None, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real `inputs` vs detached `reconstructions`, and its log."""
        logits_real = self._discriminate(inputs.detach(), cond)
        logits_fake = self._discriminate(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.clone().detach().mean(),
               f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log
