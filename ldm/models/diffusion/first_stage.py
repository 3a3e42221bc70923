"""Frozen sub-models of a LatentDiffusion: freezing, and :class:`FirstStageCodec`, the one place where images
become latents and latents images.

The first stage is any module with ``encode(x)`` returning a tensor (VQ interface, identity) or a distribution
with ``sample()``/``mode()`` (KL autoencoder), and ``decode(z)`` (optionally ``force_not_quantize=``).
"""
from __future__ import annotations

import inspect
import logging
import types
from typing import Any, Callable

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.tiling import SplitInputParams, decode_tiled, encode_tiled

logger = logging.getLogger(__name__)


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces ``module.train`` so that a frozen module stays in eval mode."""
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Puts `module` in eval mode for good (``train()`` is disabled) and stops its gradients."""
    module.eval()
    module.train = types.MethodType(disabled_train, module)
    for p in module.parameters():
        p.requires_grad = False
    return module


def mode_of(encoding: Any) -> Any:
    """The mode of a distribution (e.g. a KL posterior); tensors and anything else unchanged."""
    if isinstance(encoding, torch.Tensor) or not callable(getattr(encoding, "mode", None)):
        return encoding
    return encoding.mode()


class FirstStageCodec:
    """Encodes images to unscaled latents and decodes them, for a frozen first-stage module.

    Every first-stage call of a LatentDiffusion goes through one codec (the model scales latents by
    ``scale_factor`` around it); patch-wise encoding and decoding of large images is a codec that overrides
    :meth:`encode` and :meth:`decode`.

    :param module: the first stage (``encode``/``decode``, see the module docstring).
    :param tiling: called at every encode/decode, returns the patch-wise parameters to use then (the model's
        ``split_input_params``) or None for whole-image calls. Tiles of ``ks`` every ``stride`` are latent pixels
        to decode and image pixels to encode, as in the original; a tile larger than the input shrinks to it.
    """

    def __init__(self, module: nn.Module, tiling: Callable[[], SplitInputParams | None] | None = None) -> None:
        self.module = module
        self.tiling = tiling if tiling is not None else (lambda: None)

    def _tiles(self) -> SplitInputParams | None:
        params = self.tiling()
        return params if params is not None and params.patch_distributed_vq else None

    def encode(self, x: torch.Tensor) -> Any:
        """[N x C x H x W] images in [-1, 1] -> the encoding (a latent tensor or a distribution over it).

        Patch-wise, tensor encodings are blended as they are and a Gaussian posterior by its parameters (mean
        and log-variance), from which the distribution is rebuilt.
        """
        params = self._tiles()
        if params is None:
            return self.module.encode(x)
        kinds: list[type] = []

        def encode_tile(tile: torch.Tensor) -> torch.Tensor:
            encoding = self.module.encode(tile)
            kinds.append(type(encoding))
            if isinstance(encoding, torch.Tensor):
                return encoding
            if isinstance(encoding, DiagonalGaussianDistribution):
                return encoding.parameters
            raise TypeError(f"split_input_params: cannot blend first-stage encodings of type "
                            f"'{type(encoding).__name__}' (a tensor or a DiagonalGaussianDistribution)")

        blended = encode_tiled(encode_tile, x, params.ks, params.stride, params.vqf, params.weighting)
        return blended if issubclass(kinds[0], torch.Tensor) else DiagonalGaussianDistribution(blended)

    def decode(self, z: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Unscaled latents [N x c x h x w] -> images [N x C x H x W]; VQ interfaces quantise first unless
        `force_not_quantize`; patch-wise when the tiling says so."""
        params = self._tiles()
        if params is None:
            return self._decode(z, force_not_quantize)
        return decode_tiled(lambda tile: self._decode(tile, force_not_quantize), z, params.ks, params.stride,
                            params.vqf, params.weighting)

    def _decode(self, z: torch.Tensor, force_not_quantize: bool) -> torch.Tensor:
        if accepts_force_not_quantize(self.module):
            return self.module.decode(z, force_not_quantize=force_not_quantize)
        return self.module.decode(z)

    @staticmethod
    def latent(encoding: Any) -> torch.Tensor:
        """A latent from an encoding: a sample of a distribution, or the tensor itself."""
        if isinstance(encoding, torch.Tensor):
            return encoding
        if callable(getattr(encoding, "sample", None)):
            return encoding.sample()
        raise TypeError(f"first-stage encoding of type '{type(encoding).__name__}' is neither a tensor nor "
                        f"a distribution with sample()")

    def codebook_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Latents from codebook ids: [N x h x w] ids or [N x K x h x w] logits -> [N x C x h x w]."""
        if ids.dim() == 4:
            ids = torch.argmax(ids.exp(), dim=1).long()
        entries = self.module.quantize.get_codebook_entry(ids, shape=None)
        return entries.permute(0, 3, 1, 2).contiguous()


def accepts_force_not_quantize(first_stage: nn.Module) -> bool:
    """Whether the first stage's ``decode`` takes ``force_not_quantize`` (the VQ interface)."""
    try:
        return "force_not_quantize" in inspect.signature(first_stage.decode).parameters
    except (TypeError, ValueError):
        return False

