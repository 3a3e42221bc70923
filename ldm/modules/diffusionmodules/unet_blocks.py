"""The blocks of the diffusion UNet: residual blocks with timestep embedding, resampling, pixel self-attention.

Parameter names equal the original (guided-diffusion / CompVis) modules: ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``, ``op``/``conv``, ``norm``/``qkv``/``proj_out``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, memory_format_of,
                                              normalization, zero_module)


class TimestepBlock(nn.Module):
    """A module whose ``forward(x, emb)`` takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential container that passes the timestep embedding and the context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: an [N x C x ...] Tensor.
        :param emb: an [N x E] timestep embedding.
        :param context: an [N x M x D] cross-attention context, or None.
        """
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims if `dims` == 3), optionally followed by a 3x3 convolution.

    :param channels: input channels.
    :param use_conv: apply a convolution after upsampling.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param out_channels: output channels (defaults to `channels`; needs `use_conv` to differ).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N x C x ...] -> [N x C' x ...] with the (inner) spatial sizes doubled."""
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (inner two dims if `dims` == 3) by a strided 3x3 convolution or average pooling.

    :param channels: input channels.
    :param use_conv: strided convolution (else average pooling, which keeps the channel count).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param out_channels: output channels (defaults to `channels`).
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError(f"Downsample without conv cannot map {channels} to {out_channels} channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N x C x ...] -> [N x C' x ...] with the (inner) spatial sizes halved."""
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """A residual block conditioned on the timestep embedding, optionally changing channels or resolution.

    :param channels: input channels.
    :param emb_channels: timestep-embedding channels.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output channels (defaults to `channels`).
    :param use_conv: with a channel change, a 3x3 (not 1x1) convolution in the skip connection.
    :param use_scale_shift_norm: FiLM-like conditioning ``norm(h) * (1 + scale) + shift``.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param use_checkpoint: activation checkpointing.
    :param up: upsample 2x inside the block.
    :param down: downsample 2x inside the block.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        :param x: an [N x C x ...] Tensor of features.
        :param emb: an [N x emb_channels] Tensor of timestep embeddings.
        :return: an [N x out_channels x ...] Tensor.
        """
        return checkpoint(self._forward, (x, emb), None, self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """QKV attention on a fused tensor laid out heads-first: [N x (H * 3 * C) x T] -> [N x (H * C) x T]."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention on a fused tensor laid out q/k/v-first: [N x (3 * H * C) x T] -> [N x (H * C) x T]."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads):
            raise ValueError(f"qkv width {width} is not divisible by 3 * {self.n_heads} heads")
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs, self.n_heads, ch, length).transpose(2, 3) for t in qkv.chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(2, 3).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, residual, with a zero-initialised output projection.

    :param channels: channels C.
    :param num_heads: number of heads (used when `num_head_channels` is -1).
    :param num_head_channels: channels per head (overrides `num_heads` unless -1).
    :param use_checkpoint: activation checkpointing.
    :param use_new_attention_order: split q/k/v before heads (:class:`QKVAttention`) instead of heads first.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: an [N x C x ...] Tensor. :return: an [N x C x ...] Tensor."""
        return checkpoint(self._forward, (x,), None, self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        layout = memory_format_of(x)
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial).contiguous(memory_format=layout)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: [N x C x H x W] -> [N x output_dim] (the mean token attends to all pixels).

    :param spacial_dim: H = W of the input (sets the size of the positional embedding).
    :param embed_dim: channels C.
    :param num_heads_channels: channels per head.
    :param output_dim: output width (defaults to `embed_dim`).
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]
