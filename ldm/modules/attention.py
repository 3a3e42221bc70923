"""Cross-attention and the spatial transformer of the LDM UNet, on ``scaled_dot_product_attention``.

Parameter names equal the original CompVis modules (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; ``net.0.proj``,
``net.2``; ``attn1``, ``ff``, ``attn2``, ``norm1..3``; ``norm``, ``proj_in``, ``transformer_blocks``,
``proj_out``), so original checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, memory_format_of, zero_module


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B x N x (H * D)] -> [B x H x N x D]."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B x H x N x D] -> [B x N x (H * D)]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean key mask [B x ...] (True = attend) as an SDPA mask [B x 1 x 1 x J]."""
    return mask.reshape(mask.shape[0], 1, 1, -1).bool()


class GEGLU(nn.Module):
    """Gated GELU projection: ``a * gelu(b)`` with ``[a, b] = proj(x)``; [... x dim_in] -> [... x dim_out]."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``net = [Linear+GELU or GEGLU, Dropout, Linear]``: [... x dim] -> [... x dim_out]."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from `x` to keys/values from `context` (self-attention without it).

    :param query_dim: width of `x`.
    :param context_dim: width of `context` (defaults to `query_dim`).
    :param heads: number of heads H.
    :param dim_head: width per head D; the inner width is H * D.
    :param dropout: dropout after the output projection.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: a [B x N x query_dim] Tensor.
        :param context: a [B x M x context_dim] Tensor, or None for self-attention.
        :param mask: a boolean [B x M] (or [B x ...] flattening to M) Tensor, True where keys may be attended.
        :return: a [B x N x query_dim] Tensor.
        """
        context = x if context is None else context
        if context.shape[-1] != self.to_k.in_features:
            raise ValueError(f"CrossAttention expects a context of width {self.to_k.in_features}, got "
                             f"{tuple(context.shape)} (no context means self-attention on inputs of that width)")
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        attn_mask = None if mask is None else key_padding_mask(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.to_out(merge_heads(out))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, gated feed-forward; [B x N x dim] -> same.

    :param dim: token width.
    :param n_heads: number of heads.
    :param d_head: width per head.
    :param dropout: dropout in attention outputs and the feed-forward.
    :param context_dim: width of the cross-attention context (None: ``attn2`` is another self-attention).
    :param gated_ff: GEGLU feed-forward (the original always uses it).
    :param checkpoint: recompute activations in the backward pass.
    :param disable_self_attn: make ``attn1`` attend to the context too (as Stable Diffusion 2 can).
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = False, disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [B x N x dim]. :param context: [B x M x context_dim] or None. :return: [B x N x dim]."""
        return checkpoint(self._forward, (x, context), None, self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image-like feature map, with cross-attention to a context.

    GroupNorm, project to tokens [B x (H W) x inner], run `depth` transformer blocks, project back (zero-initialised,
    so the block is the identity at init) and add the input.

    :param in_channels: channels C of the feature map.
    :param n_heads: number of heads; ``inner_dim = n_heads * d_head``.
    :param d_head: width per head.
    :param depth: number of transformer blocks.
    :param dropout: dropout in the blocks.
    :param context_dim: width of the context (None: self-attention only).
    :param use_linear: project with Linear layers on tokens instead of 1x1 convolutions (Stable Diffusion 2).
    :param disable_self_attn: see :class:`BasicTransformerBlock`.
    :param use_checkpoint: activation checkpointing of each block.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False, disable_self_attn: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint, disable_self_attn=disable_self_attn)
            for _ in range(depth)
        ])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: a [B x C x H x W] Tensor.
        :param context: a [B x M x context_dim] Tensor (None: the cross-attention attends to the pixels).
        :return: a [B x C x H x W] Tensor.
        """
        b, c, h, w = x.shape
        x_in = x
        layout = memory_format_of(x_in)
        x = self.norm(x)
        # tokens [B x HW x C] are the channels-last view of a map; both directions restore a dense layout (the
        # map's own on the way back), so no convolution sees activations whose layout differs from its weight's
        if self.use_linear:
            x = self.proj_in(x.flatten(2).transpose(1, 2).contiguous())
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x).transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=layout)
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=layout))
        return x + x_in
