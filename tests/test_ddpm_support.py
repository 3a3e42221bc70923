"""Tiny stand-in networks for the DDPM/LatentDiffusion tests (importable as configs' targets from tests/)."""
from __future__ import annotations

import torch
from torch import nn


class ScaleUNet(nn.Module):
    """Outputs ``weight * x`` (first `out_channels` channels): a network whose output is known by hand."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, init: float = 0.5) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x, timesteps, context=None, y=None):
        return self.weight * x[:, :self.out_channels]


class SpyUNet(nn.Module):
    """Records what it receives and returns the first `out_channels` channels of x plus a learnable bias."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context=None, y=None):
        self.calls.append({"x": x, "t": timesteps, "context": context, "y": y})
        return x[:, :self.out_channels] + self.bias[None, :, None, None]


class TinyCondUNet(nn.Module):
    """A small time- and context-conditional conv net (enough to learn a class-conditional toy problem)."""

    def __init__(self, in_channels: int = 2, out_channels: int = 2, hidden: int = 32, context_dim: int = 8,
                 timesteps: int = 1000) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.t_emb = nn.Embedding(timesteps, hidden)
        self.c_proj = nn.Linear(context_dim, hidden)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def forward(self, x, timesteps, context=None, y=None):
        h = self.inp(x) + self.t_emb(timesteps.long())[:, :, None, None]
        if context is not None:
            h = h + self.c_proj(context.mean(1))[:, :, None, None]
        h = self.mid(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h))


class IdentityStage(nn.Module):
    """A first stage with ``encode(x) = x`` and ``decode(z) = z``; one parameter to check freezing."""

    def __init__(self, embed_dim: int = 3) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class Gaussian:
    """A diagonal Gaussian with sample() and mode(), like DiagonalGaussianDistribution."""

    def __init__(self, mean: torch.Tensor, std: float) -> None:
        self.mean, self.std = mean, std

    def sample(self):
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self):
        return self.mean


class ScaledKLStage(nn.Module):
    """A KL-style first stage: encode returns a distribution around ``scale * x``; decode divides."""

    def __init__(self, embed_dim: int = 3, scale: float = 4.0) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Parameter(torch.ones(1))

    def encode(self, x):
        return Gaussian(self.scale * x, 0.0)

    def decode(self, z):
        return z / self.scale


class TinyClassEmbedder(nn.Module):
    """``forward(batch, key) -> [N x 1 x D]`` like ClassEmbedder, with ``n_classes`` and ``key``."""

    def __init__(self, embed_dim: int = 8, n_classes: int = 4, key: str = "class_label") -> None:
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        labels = torch.as_tensor(batch[key or self.key]).to(self.embedding.weight.device)
        return self.embedding(labels.long())[:, None]


class TinyTextEncoder(nn.Module):
    """``encode(list[str]) -> [N x 2 x D]``: features from the caption length (empty caption -> zeros)."""

    def __init__(self, embed_dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(1, embed_dim, bias=False)

    def encode(self, text):
        lengths = torch.tensor([[float(len(s))] for s in text], device=self.proj.weight.device)
        return self.proj(lengths)[:, None].expand(-1, 2, -1)


def clip_vit_l14_text_encoder(max_length: int = 77):
    """FrozenCLIPEmbedder around a randomly initialised ViT-L/14 CLIP text model built from its config, so that
    no files are read: the same module names and shapes as Stable Diffusion v1 (for meta-device tests)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.hf import FrozenCLIPEmbedder

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                            hidden_act="quick_gelu")
    return FrozenCLIPEmbedder.from_components(None, CLIPTextModel(config), max_length=max_length)
