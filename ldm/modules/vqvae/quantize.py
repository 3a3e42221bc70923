"""Vector quantisation of first-stage latents (the semantics of taming-transformers' `VectorQuantizer2`)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


def _squared_distances(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(z - e)^2 = z^2 + e^2 - 2 z.e for [M x D] latents and [K x D] codes: [M x K], in float32 even under autocast
    (a bf16 distance would pick wrong nearest codes)."""
    off = torch.amp.is_autocast_available(z.device.type)
    with torch.autocast(z.device.type, enabled=False) if off else contextlib.nullcontext():
        z, codes = z.float(), codes.float()
        return z.pow(2).sum(dim=1, keepdim=True) + codes.pow(2).sum(dim=1) - 2 * z @ codes.t()


class VectorQuantizer2(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    The loss is ``||sg(z_q) - z||^2 + beta * ||z_q - sg(z)||^2`` when `legacy` (the original's default, which puts
    `beta` on the codebook term by mistake), and ``beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2`` otherwise.

    :param n_e: number of codebook entries.
    :param e_dim: dimension of each entry (the channel count of the latents).
    :param beta: commitment weight.
    :param remap: path of a ``.npy`` file with the used subset of indices; indices are then reported in that
        subset's numbering (buffer ``used``).
    :param unknown_index: what an index outside `remap` becomes: ``"random"``, ``"extra"`` (one extra index) or
        an integer.
    :param sane_index_shape: return indices as [N x H x W] instead of [N*H*W x 1].
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, remap: str | None = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False, legacy: bool = True) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

        self.remap = remap
        if remap is not None:
            path = Path(remap)
            if not path.is_file():
                raise FileNotFoundError(f"VectorQuantizer2: remap file not found: {path} (a .npy array of the used "
                                        f"codebook indices)")
            self.register_buffer("used", torch.tensor(np.load(path, allow_pickle=False)))
            self.re_embed = self.used.shape[0]
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not isinstance(unknown_index, int):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")
            self.unknown_index = unknown_index
            logger.info("remapping %d indices to %d indices; using %s for unknown indices",
                        n_e, self.re_embed, unknown_index)
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices [N x ...] -> their positions in `used` (unknown ones per `unknown_index`)."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` [N x ...] -> codebook indices (the extra index maps to entry `used[0]`)."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1).clone()
        used = self.used.to(inds)
        if self.re_embed > self.used.shape[0]:
            inds[inds >= self.used.shape[0]] = 0
        return used[inds].reshape(ishape)

    def forward(self, z: torch.Tensor, temp: float | None = None, rescale_logits: bool = False,
                return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Quantises `z`.

        :param z: an [N x e_dim x H x W] Tensor.
        :return: (z_q [N x e_dim x H x W] with straight-through gradient, the scalar VQ loss,
            (None, None, indices)) with indices [N*H*W] ([N*H*W x 1] in the `remap` numbering if `remap`),
            or [N x H x W] if `sane_index_shape`. `temp`, `rescale_logits`, `return_logits` exist for interface
            compatibility with the Gumbel quantiser and must stay at their defaults.
        """
        if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits only exist for interface compatibility "
                             "with the Gumbel quantiser")
        if z.shape[1] != self.e_dim:
            raise ValueError(f"expected latents with {self.e_dim} channels, got shape {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()  # [N x H x W x C]
        z_flat = z.view(-1, self.e_dim)
        indices = torch.argmin(_squared_distances(z_flat, self.embedding.weight), dim=1)
        z_q = self.embedding(indices).view(z.shape)

        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook = torch.mean((z_q - z.detach()) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook

        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors of `indices` (in the `remap` numbering if set).

        :param indices: an integer Tensor of any shape [...] (e.g. [N x h x w], or N*h*w flat with `shape`).
        :param shape: (N, h, w, C) to return an [N x C x h x w] Tensor; None returns [... x C] (the indices' shape
            with the code dimension appended, as the original).
        """
        if self.remap is not None:
            batch = shape[0] if shape is not None else indices.shape[0]
            indices = self.unmap_to_all(indices.reshape(batch, -1)).reshape(indices.shape)
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


VectorQuantizer = VectorQuantizer2
