"""A small pre-norm transformer encoder with the parameter names of the old lucidrains ``x-transformers``.

Only the configuration that latent diffusion uses is implemented (``Encoder`` of attention + feed-forward layers,
absolute positional embedding, ``TransformerWrapper``), on ``scaled_dot_product_attention``. State-dict names
match the original (``token_emb``, ``pos_emb.emb``, ``attn_layers.layers.{i}.{0,1}``, ``norm``, ``to_logits``)
so that BERTEmbedder / TransformerEmbedder checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import FeedForward, key_padding_mask, merge_heads, split_heads

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """Learned absolute positions: [B x N x ...] -> a [1 x N x dim] embedding."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.max_seq_len:
            raise ValueError(f"sequence length {n} exceeds max_seq_len {self.max_seq_len}")
        return self.emb(torch.arange(n, device=x.device))[None]


class Attention(nn.Module):
    """Multi-head self-attention: [B x N x dim] -> [B x N x dim] (``to_q``/``to_k``/``to_v`` without bias)."""

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [B x N x dim]. :param mask: boolean [B x N], True for real tokens. :return: [B x N x dim]."""
        q, k, v = (split_heads(t, self.heads) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        attn_mask = None if mask is None else key_padding_mask(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(merge_heads(out))


class Residual(nn.Module):
    """``out + residual`` (a module so the layer triplets keep the original's indices)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class AttentionLayers(nn.Module):
    """`depth` pre-norm blocks of (self-attention, feed-forward); each layer is ``[LayerNorm, block, Residual]``.

    :param dim: token width.
    :param depth: number of (attention, feed-forward) pairs.
    :param heads: attention heads.
    :param attn_dim_head: width per head (the inner width is ``heads * attn_dim_head``, independent of `dim`).
    :param attn_dropout: dropout on attention weights.
    :param ff_mult: feed-forward expansion factor.
    :param ff_glu: gated (GEGLU) feed-forward.
    :param ff_dropout: dropout inside the feed-forward.
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, attn_dim_head: int = DEFAULT_DIM_HEAD,
                 attn_dropout: float = 0.0, ff_mult: float = 4, ff_glu: bool = False, ff_dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for layer_type in self.layer_types:
            block = (Attention(dim, dim_head=attn_dim_head, heads=heads, dropout=attn_dropout) if layer_type == "a"
                     else FeedForward(dim, mult=ff_mult, glu=ff_glu, dropout=ff_dropout))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [B x N x dim]. :param mask: boolean [B x N] (True: real token). :return: [B x N x dim]."""
        for layer_type, (norm, block, residual_fn) in zip(self.layer_types, self.layers):
            out = block(norm(x), mask=mask) if layer_type == "a" else block(norm(x))
            x = residual_fn(out, x)
        return x


class Encoder(AttentionLayers):
    """A bidirectional (non-causal) stack of :class:`AttentionLayers`."""


class TransformerWrapper(nn.Module):
    """Token + position embedding, an attention stack, a final LayerNorm and a logits head.

    :param num_tokens: vocabulary size.
    :param max_seq_len: number of positions.
    :param attn_layers: the :class:`AttentionLayers` (e.g. an :class:`Encoder`).
    :param emb_dim: embedding width (defaults to the layers' width; projected if different).
    :param emb_dropout: dropout on the embeddings.
    :param use_pos_emb: add learned absolute positions.
    """

    def __init__(self, *, num_tokens: int, max_seq_len: int, attn_layers: AttentionLayers,
                 emb_dim: int | None = None, emb_dropout: float = 0.0, use_pos_emb: bool = True):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers must be an Encoder/AttentionLayers, got {type(attn_layers).__name__}")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        :param x: an [B x N] Tensor of token ids.
        :param return_embeddings: return the normalised hidden states instead of logits.
        :param mask: boolean [B x N], True for real tokens (padding keys are not attended to).
        :return: [B x N x dim] embeddings or [B x N x num_tokens] logits.
        """
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.project_emb(self.emb_dropout(h))
        h = self.norm(self.attn_layers(h, mask=mask))
        return h if return_embeddings else self.to_logits(h)
