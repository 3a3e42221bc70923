"""Conditioners tau(y) of latent diffusion: class labels, text (BERT tokens + transformer, CLIP), spatial maps.

Constructor arguments and parameter names follow the original CompVis conditioners, so their configs and
checkpoints keep working. The original ``device="cuda"`` arguments are accepted and ignored: every module runs
on the device of its parameters.
"""
from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.hf import (
    CLIPLayer,
    FrozenCLIPEmbedder,
    FrozenHFTextEmbedder,
    FrozenTextEncoder,
    resolve_local_model,
)
from ldm.modules.x_transformer import Encoder, TransformerWrapper
from ldm.util import parse_enum

__all__ = ["AbstractEncoder", "ClassEmbedder", "TransformerEmbedder", "BERTTokenizer", "BERTEmbedder",
           "SpatialRescaler", "FrozenCLIPEmbedder", "CLIPLayer", "FrozenHFTextEmbedder", "FrozenTextEncoder"]

logger = logging.getLogger(__name__)


class AbstractEncoder(nn.Module):
    """A conditioner with an ``encode`` method (what ``LatentDiffusion.get_learned_conditioning`` calls)."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class ClassEmbedder(nn.Module):
    """Class labels -> learned embeddings for cross-attention: [N] labels -> an [N x 1 x embed_dim] Tensor.

    The embedder only encodes: conditioning dropout and the null class belong to the model that uses it
    (``ldm.models.diffusion.conditioning.ConditionBuilder``).

    :param embed_dim: embedding width.
    :param n_classes: number of classes (with classifier-free guidance the last one is the null class).
    :param key: the batch key holding the labels.
    :param ucg_rate: conditioning dropout rate for classifier-free guidance, as in SD2-style configs; a
        LatentDiffusion applies it (once) when its own ``ucg_rate`` is not set.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.0):
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ClassEmbedder: ucg_rate must be in [0, 1], got {ucg_rate}")
        self.key = key
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, Any] | torch.Tensor | Sequence[int], key: str | None = None) -> torch.Tensor:
        """
        :param batch: a batch dict holding [N] integer labels under `key`, or the labels themselves.
        :param key: overrides the configured key.
        :return: an [N x 1 x embed_dim] Tensor.
        """
        key = self.key if key is None else key
        if isinstance(batch, Mapping):
            if key not in batch:
                raise KeyError(f"ClassEmbedder: the batch has no key '{key}' (keys: {', '.join(map(str, batch))})")
            batch = batch[key]
        labels = torch.as_tensor(batch, device=self.embedding.weight.device).long().reshape(-1)
        return self.embedding(labels[:, None])


class TransformerEmbedder(AbstractEncoder):
    """A trainable transformer encoder on token ids: [N x L] ids -> an [N x L x n_embed] Tensor.

    :param n_embed: width.
    :param n_layer: number of (attention, feed-forward) layers.
    :param vocab_size: number of token ids.
    :param max_seq_len: number of positions.
    :param device: accepted for config compatibility and ignored.
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int, max_seq_len: int = 77, device: Any = None):
        super().__init__()
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens)


class BERTTokenizer(AbstractEncoder):
    """The uncased BERT WordPiece tokenizer: prompts -> an [N x max_length] Tensor of token ids (vocab 30522).

    The tokenizer is read on first use (configs instantiate without it) from a local directory or the Hugging
    Face cache, never downloaded.

    :param device: accepted for config compatibility; tokens are returned on the CPU.
    :param vq_interface: ``encode`` returns ``(None, None, [None, None, tokens])`` like a VQ model.
    :param max_length: token length (truncated/padded).
    :param version: hub id in the local cache, or a directory with ``vocab.txt``/``tokenizer.json``.
    """

    def __init__(self, device: Any = None, vq_interface: bool = True, max_length: int = 77,
                 version: str = "bert-base-uncased"):
        super().__init__()
        self.vq_interface = vq_interface
        self.max_length = max_length
        self.version = version
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import BertTokenizerFast

            directory = resolve_local_model(self.version, required=(("vocab.txt", "tokenizer.json"),),
                                            what="BERT tokenizer")
            self._tokenizer = BertTokenizerFast.from_pretrained(directory, local_files_only=True)
        return self._tokenizer

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        text = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        return enc["input_ids"]

    @torch.no_grad()
    def encode(self, text: str | Sequence[str]) -> Any:
        tokens = self(text)
        return (None, None, [None, None, tokens]) if self.vq_interface else tokens

    def decode(self, text: Any) -> Any:
        return text


class BERTEmbedder(AbstractEncoder):
    """BERT tokens + a trainable transformer (LDM text-to-image): prompts -> an [N x max_seq_len x n_embed] Tensor.

    :param n_embed: width.
    :param n_layer: number of (attention, feed-forward) layers.
    :param vocab_size: number of token ids.
    :param max_seq_len: token length.
    :param device: accepted for config compatibility and ignored.
    :param use_tokenizer: tokenize text with :class:`BERTTokenizer` (else the input is already token ids).
    :param embedding_dropout: dropout on the token embeddings.
    :param tokenizer_version: where the BERT tokenizer is (see :class:`BERTTokenizer`).
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 device: Any = None, use_tokenizer: bool = True, embedding_dropout: float = 0.0,
                 tokenizer_version: str = "bert-base-uncased"):
        super().__init__()
        self.use_tknz_fn = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(vq_interface=False, max_length=max_seq_len, version=tokenizer_version)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = self.tknz_fn(text) if self.use_tknz_fn else text
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True)

    def encode(self, text: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        return self(text)


class InterpolationMethod(str, enum.Enum):
    NEAREST = "nearest"
    LINEAR = "linear"
    BILINEAR = "bilinear"
    TRILINEAR = "trilinear"
    BICUBIC = "bicubic"
    AREA = "area"


class SpatialRescaler(nn.Module):
    """Resizes a spatial conditioning `n_stages` times by `multiplier`, then optionally maps its channels.

    [N x in_channels x H x W] -> [N x out_channels x H * m^n x W * m^n].

    :param n_stages: number of resizing steps (>= 0).
    :param method: interpolation mode (nearest, linear, bilinear, trilinear, bicubic, area).
    :param multiplier: scale factor per step.
    :param in_channels: input channels.
    :param out_channels: if set, a 1x1 convolution ``channel_mapper`` maps to this many channels.
    :param bias: bias of the channel mapper.
    """

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: int | None = None, bias: bool = False):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        self.method = parse_enum(InterpolationMethod, method, "method")
        self.n_stages = n_stages
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            logger.info("SpatialRescaler maps %d to %d channels after resizing", in_channels, out_channels)
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method.value)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)
