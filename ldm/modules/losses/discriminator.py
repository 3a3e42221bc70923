"""The pix2pix N-layer patch discriminator and ActNorm (the semantics of taming-transformers' versions)."""
from __future__ import annotations

import torch
from torch import nn

from ldm.distributed import global_mean_std, is_distributed


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the statistics of the first training batch.

    ``y = scale * (x + loc)``; on the first forward in training mode, loc = -mean and scale = 1 / (std + 1e-6)
    of that batch (per channel), after which both are ordinary parameters. Input [N x C x H x W] or [N x C].
    """

    def __init__(self, num_features: int, logdet: bool = False, affine: bool = True,
                 allow_reverse_init: bool = False) -> None:
        if not affine:
            raise ValueError("ActNorm is always affine (affine=False is not supported)")
        super().__init__()
        self.logdet = logdet
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.allow_reverse_init = allow_reverse_init
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Sets loc and scale from the per-channel mean and std of `x` [N x C x H x W]; with several processes, of
        the ranks' batches together (so every rank starts from the same values, those of one process)."""
        if is_distributed():
            mean, std = global_mean_std(x, dims=(0, 2, 3))
        else:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            mean, std = flat.mean(1), flat.std(1)
        self.loc.copy_(-mean.view(1, -1, 1, 1))
        self.scale.copy_(1.0 / (std.view(1, -1, 1, 1) + 1e-6))

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self.training and self.initialized.item() == 0:
            self.initialize(x)
            self.initialized.fill_(1)

    def forward(self, x: torch.Tensor, reverse: bool = False):
        if reverse:
            return self.reverse(x)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, :, None, None]
        self._maybe_initialize(x)
        h = self.scale * (x + self.loc)
        if squeeze:
            h = h.squeeze(-1).squeeze(-1)
        if self.logdet:
            logdet = x.shape[2] * x.shape[3] * torch.sum(torch.log(torch.abs(self.scale)))
            return h, logdet * torch.ones(x.shape[0]).to(x)
        return h

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        squeeze = y.ndim == 2
        if squeeze:
            y = y[:, :, None, None]
        if self.training and self.initialized.item() == 0:
            if not self.allow_reverse_init:
                raise RuntimeError("initializing ActNorm in reverse direction is disabled; "
                                   "use allow_reverse_init=True to enable it")
            self._maybe_initialize(y)
        h = y / self.scale - self.loc
        return h.squeeze(-1).squeeze(-1) if squeeze else h


def weights_init(m: nn.Module) -> None:
    """pix2pix initialisation: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02) and biases 0."""
    classname = m.__class__.__name__
    if "Conv" in classname:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in classname:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix): [N x input_nc x H x W] -> logits [N x 1 x H' x W'], one per patch.

    With the default 3 layers and a 256x256 input the output is 30x30 (receptive field 70x70).

    :param use_actnorm: ActNorm instead of BatchNorm (conv layers before ActNorm then have biases).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm
        kw, padw = 4, 1
        sequence: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw),
                                     nn.LeakyReLU(0.2, True)]
        nf_mult = 1
        for n in range(1, n_layers):
            nf_mult_prev, nf_mult = nf_mult, min(2 ** n, 8)
            sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=2, padding=padw,
                                   bias=use_bias),
                         norm_layer(ndf * nf_mult),
                         nn.LeakyReLU(0.2, True)]
        nf_mult_prev, nf_mult = nf_mult, min(2 ** n_layers, 8)
        sequence += [nn.Conv2d(ndf * nf_mult_prev, ndf * nf_mult, kernel_size=kw, stride=1, padding=padw,
                               bias=use_bias),
                     norm_layer(ndf * nf_mult),
                     nn.LeakyReLU(0.2, True),
                     nn.Conv2d(ndf * nf_mult, 1, kernel_size=kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*sequence)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
