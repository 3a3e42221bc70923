"""The time-conditional UNet of latent diffusion (``UNetModel``), compatible with the original checkpoints.

The blocks live in :mod:`ldm.modules.diffusionmodules.unet_blocks`; they are re-exported here under the original
import paths (``openaimodel.ResBlock``, ``openaimodel.TimestepEmbedSequential``, ...).
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Sequence

import torch
from torch import nn

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.unet_blocks import (
    AttentionBlock,
    AttentionPool2d,
    Downsample,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
)
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module

__all__ = ["UNetModel", "EncoderUNetModel", "AttentionBlock", "AttentionPool2d", "Downsample", "QKVAttention",
           "QKVAttentionLegacy", "ResBlock", "TimestepBlock", "TimestepEmbedSequential", "Upsample"]


@dataclasses.dataclass(frozen=True)
class _BlockOptions:
    """The UNetModel arguments that shape its residual and attention blocks."""

    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    use_spatial_transformer: bool
    transformer_depth: int
    context_dim: int | None
    legacy: bool
    use_linear: bool


def _validate_arguments(use_spatial_transformer: bool, context_dim: int | None, num_heads: int,
                        num_head_channels: int, use_fp16: bool) -> None:
    """Raises ValueError for the combinations of UNetModel arguments the original rejected (or silently broke on)."""
    if use_spatial_transformer and context_dim is None:
        raise ValueError("UNetModel: use_spatial_transformer=True needs 'context_dim' (the width of the "
                         "cross-attention conditioning)")
    if context_dim is not None and not use_spatial_transformer:
        raise ValueError("UNetModel: 'context_dim' is set but use_spatial_transformer is False; cross-attention "
                         "conditioning needs use_spatial_transformer=True")
    if num_heads == -1 and num_head_channels == -1:
        raise ValueError("UNetModel: set either 'num_heads' or 'num_head_channels'")
    if use_fp16:
        raise ValueError("UNetModel: use_fp16=True is not supported (the original's float16 path never worked); "
                         "use mixed precision instead, e.g. Lightning precision='bf16-mixed'")


class UNetTrunk(nn.Module):
    """The parts UNetModel and EncoderUNetModel share: timestep embedding, residual/attention blocks, encoder."""

    def _setup_trunk(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                     num_res_blocks: int, attention_resolutions: Sequence[int], dropout: float,
                     channel_mult: Sequence[int], conv_resample: bool, dims: int, use_checkpoint: bool,
                     num_heads: int, num_head_channels: int, num_heads_upsample: int, options: _BlockOptions) -> int:
        """Stores the shared hyper-parameters and builds ``time_embed``; returns the embedding width."""
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(int(r) for r in attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.conv_resample = conv_resample
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self._dims = dims
        self._options = options
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        return time_embed_dim

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recomputes (or stops recomputing) the activations of every residual, attention and transformer block
        in the backward pass, as ``use_checkpoint`` does at construction (non-reentrant, one block at a time)."""
        self.use_checkpoint = enabled
        for module in self.modules():
            if isinstance(module, (ResBlock, AttentionBlock)):
                module.use_checkpoint = enabled
            elif isinstance(module, BasicTransformerBlock):
                module.checkpoint = enabled

    def _time_embedding(self, timesteps: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """[N] (or scalar) timesteps -> the [N x 4 * model_channels] embedding, in the model's dtype."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))

    def _res_block(self, ch: int, emb_ch: int, out_ch: int | None = None, up: bool = False,
                   down: bool = False) -> ResBlock:
        return ResBlock(ch, emb_ch, self.dropout, out_channels=out_ch, dims=self._dims,
                        use_checkpoint=self.use_checkpoint,
                        use_scale_shift_norm=self._options.use_scale_shift_norm, up=up, down=down)

    def _attention(self, ch: int, decoder: bool) -> nn.Module:
        """The attention block at width `ch`, with the original's rule for heads and head width."""
        opts = self._options
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if opts.use_spatial_transformer:
            if opts.legacy:
                dim_head = ch // heads
            # no dropout inside the transformer: the original did not pass it on
            return SpatialTransformer(ch, heads, dim_head, depth=opts.transformer_depth,
                                      context_dim=opts.context_dim, use_linear=opts.use_linear,
                                      use_checkpoint=self.use_checkpoint)
        if opts.legacy:
            dim_head = self.num_head_channels
        return AttentionBlock(ch, num_heads=self.num_heads_upsample if decoder else heads, num_head_channels=dim_head,
                              use_checkpoint=self.use_checkpoint,
                              use_new_attention_order=opts.use_new_attention_order)

    def _build_encoder(self, emb_ch: int) -> list[int]:
        """Builds ``input_blocks``; returns the channels of every skip connection, in order."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(self._dims, self.in_channels, mc, 3,
                                                                           padding=1))])
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, emb_ch, out_ch=mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self._res_block(ch, emb_ch, out_ch=ch, down=True) if self._options.resblock_updown
                        else Downsample(ch, self.conv_resample, dims=self._dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self._bottom_ds = ds
        return chans


class UNetModel(UNetTrunk):
    """The full UNet with timestep embedding, self-attention or cross-attention (SpatialTransformer) blocks.

    :param image_size: spatial size of the inputs (informational; any size divisible by 2^(levels-1) works).
    :param in_channels: channels of the input Tensor.
    :param model_channels: base channel count.
    :param out_channels: channels of the output Tensor.
    :param num_res_blocks: residual blocks per level.
    :param attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention is used.
    :param dropout: dropout rate in the residual blocks.
    :param channel_mult: channel multiplier per level.
    :param conv_resample: learned convolutions for up/downsampling.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: if set, class-conditional through ``label_emb`` (pass `y`).
    :param use_checkpoint: activation checkpointing (``torch.utils.checkpoint``, non-reentrant).
    :param use_fp16: unsupported (the original's float16 path was broken); use autocast / Lightning precision.
    :param num_heads: attention heads (when `num_head_channels` is -1).
    :param num_head_channels: channels per head (overrides `num_heads` unless -1).
    :param num_heads_upsample: heads of the decoder's self-attention blocks (defaults to `num_heads`).
    :param use_scale_shift_norm: FiLM-like conditioning in residual blocks.
    :param resblock_updown: residual blocks for up/downsampling.
    :param use_new_attention_order: q/k/v-first layout of the fused qkv projection.
    :param use_spatial_transformer: SpatialTransformer (cross-attention to `context`) instead of AttentionBlock.
    :param transformer_depth: transformer blocks per SpatialTransformer.
    :param context_dim: width of the cross-attention context (required with `use_spatial_transformer`).
    :param n_embed: if set, predict logits over a codebook of that size (``id_predictor``) instead of ``out``.
    :param legacy: the original's head-width rule (kept for checkpoint compatibility).
    :param use_linear_in_transformer: Linear instead of 1x1-conv projections in SpatialTransformer (SD 2).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
    ):
        super().__init__()
        _validate_arguments(use_spatial_transformer, context_dim, num_heads, num_head_channels, use_fp16)
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None
        options = _BlockOptions(use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                                use_new_attention_order=use_new_attention_order,
                                use_spatial_transformer=use_spatial_transformer, transformer_depth=transformer_depth,
                                context_dim=None if context_dim is None else int(context_dim), legacy=legacy,
                                use_linear=use_linear_in_transformer)
        time_embed_dim = self._setup_trunk(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                                           attention_resolutions, dropout, channel_mult, conv_resample, dims,
                                           use_checkpoint, num_heads, num_head_channels, num_heads_upsample, options)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        input_block_chans = self._build_encoder(time_embed_dim)
        ch = input_block_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, time_embed_dim),
            self._attention(ch, decoder=False),
            self._res_block(ch, time_embed_dim),
        )
        ch = self._build_decoder(time_embed_dim, input_block_chans)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    def _build_decoder(self, emb_ch: int, input_block_chans: list[int]) -> int:
        """Builds ``output_blocks`` consuming the skip channels; returns the final channel count."""
        mc = self.model_channels
        chans = list(input_block_chans)
        ch, ds = chans[-1], self._bottom_ds
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res_block(ch + chans.pop(), emb_ch, out_ch=mc * mult)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, decoder=True))
                if level and i == self.num_res_blocks:
                    layers.append(self._res_block(ch, emb_ch, out_ch=ch, up=True) if self._options.resblock_updown
                                  else Upsample(ch, self.conv_resample, dims=self._dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: an [N x C x ...] Tensor of inputs.
        :param timesteps: an [N] Tensor of timesteps (a scalar or a 0-d Tensor is broadcast to N).
        :param context: an [N x M x context_dim] cross-attention context (SpatialTransformer models).
        :param y: an [N] Tensor of class labels (if ``num_classes`` is set).
        :return: an [N x out_channels x ...] Tensor (or [N x n_embed x ...] logits if ``n_embed`` is set).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel: pass class labels 'y' if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        emb = self._time_embedding(timesteps, x)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"UNetModel: labels 'y' must have shape [{x.shape[0]}], got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        h = h.to(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)


class Pooling(str, enum.Enum):
    """How EncoderUNetModel reduces its features to a vector."""

    ADAPTIVE = "adaptive"      # global average pooling, zero-initialised 1x1 convolution
    ATTENTION = "attention"    # CLIP-style attention pooling (needs num_head_channels)
    SPATIAL = "spatial"        # MLP (ReLU) on the spatial means of every block's features
    SPATIAL_V2 = "spatial_v2"  # MLP (GroupNorm + SiLU) on the same


class EncoderUNetModel(UNetTrunk):
    """The encoder half of the UNet with a pooled head, e.g. a noisy-image classifier: [N x C x H x W] -> [N x K].

    Arguments as :class:`UNetModel` (self-attention only), plus `pool` (see :class:`Pooling`).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__()
        _validate_arguments(False, None, num_heads, num_head_channels, use_fp16)
        try:
            self.pool = Pooling(pool)
        except ValueError:
            raise ValueError(f"EncoderUNetModel: unknown pool '{pool}'; choose one of "
                             f"{', '.join(p.value for p in Pooling)}") from None
        options = _BlockOptions(use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                                use_new_attention_order=use_new_attention_order, use_spatial_transformer=False,
                                transformer_depth=1, context_dim=None, legacy=True, use_linear=False)
        time_embed_dim = self._setup_trunk(image_size, in_channels, model_channels, out_channels, num_res_blocks,
                                           attention_resolutions, dropout, channel_mult, conv_resample, dims,
                                           use_checkpoint, num_heads, num_head_channels, num_heads_upsample, options)
        chans = self._build_encoder(time_embed_dim)
        ch = chans[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, time_embed_dim),
            self._attention(ch, decoder=False),
            self._res_block(ch, time_embed_dim),
        )
        self.out = self._head(ch, sum(chans) + ch)

    def _head(self, ch: int, feature_size: int) -> nn.Module:
        if self.pool is Pooling.ADAPTIVE:
            return nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                 zero_module(conv_nd(self._dims, ch, self.out_channels, 1)), nn.Flatten())
        if self.pool is Pooling.ATTENTION:
            if self.num_head_channels == -1:
                raise ValueError("EncoderUNetModel: pool='attention' needs num_head_channels")
            return nn.Sequential(normalization(ch), nn.SiLU(),
                                 AttentionPool2d(self.image_size // self._bottom_ds, ch, self.num_head_channels,
                                                 self.out_channels))
        if self.pool is Pooling.SPATIAL:
            return nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, self.out_channels))
        return nn.Sequential(nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(),
                             nn.Linear(2048, self.out_channels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x C x H x W] Tensor of inputs.
        :param timesteps: an [N] Tensor of timesteps (or a scalar).
        :return: an [N x out_channels] Tensor.
        """
        emb = self._time_embedding(timesteps, x)
        spatial = self.pool in (Pooling.SPATIAL, Pooling.SPATIAL_V2)
        means = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1).to(x.dtype))
        return self.out(h.to(x.dtype))
