"""LPIPS perceptual distance (VGG16 features + learned linear heads), with the original's parameter names.

Names as in taming-transformers' `LPIPS`: ``scaling_layer.{shift,scale}``, ``net.slice{1..5}.{i}.*`` (VGG16
``features.{i}``), ``lin{0..4}.model.1.weight``. The linear heads ship with the `lpips` PyPI package
(``lpips/weights/v0.1/vgg.pth``); the VGG16 backbone is torchvision's ImageNet file, read from the torch hub cache.
Nothing is ever downloaded.
"""
from __future__ import annotations

import enum
import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import load_state_dict
from ldm.util import parse_enum

logger = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
# VGG16 configuration "D": conv widths, "M" = max-pool; the slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


class PerceptualWeights(str, enum.Enum):
    """Where the VGG16 backbone of LPIPS comes from."""

    PRETRAINED = "pretrained"  # torchvision's ImageNet weights from the torch hub cache (required for real training)
    RANDOM = "random"  # randomly initialised backbone: only for tests and smoke runs

    @classmethod
    def parse(cls, value: str | PerceptualWeights) -> PerceptualWeights:
        return parse_enum(cls, value, "perceptual_weights")


def vgg16_weights_path() -> Path:
    """Where the ImageNet VGG16 weights are expected: ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def lpips_heads_path() -> Path:
    """The linear-head weights shipped inside the `lpips` package (located without importing it, which is slow)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        raise ImportError("the LPIPS loss needs the `lpips` package for its linear-head weights: pip install lpips")
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the input normalisation of the LPIPS VGG: (x - shift) / scale, per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 conv (no bias) from `chn_in` channels to `chn_out`, after an optional dropout (names ``model.{0,1}``)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VGG16Features(nn.Module):
    """VGG16 `features` cut into five slices; returns the five [N x C_k x H_k x W_k] activations."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = v
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # features.30, never reached
        start = 0
        for k, end in enumerate(_SLICE_ENDS, start=1):
            s = nn.Sequential()
            for i in range(start, end):
                s.add_module(str(i), layers[i])
            setattr(self, f"slice{k}", s)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs

    def load_torchvision(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Loads torchvision's ``vgg16`` state dict (``features.{i}.*`` keys; the classifier is ignored)."""
        ours = {}
        for key, value in state_dict.items():
            if not key.startswith("features."):
                continue
            index = int(key.split(".")[1])
            k = next(k for k, end in enumerate(_SLICE_ENDS, start=1) if index < end)
            ours[f"slice{k}.{key[len('features.'):]}"] = value
        self.load_state_dict(ours, strict=True)


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalises [N x C x H x W] features along C."""
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


def spatial_average(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    return x.mean([2, 3], keepdim=keepdim)


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity (VGG variant, v0.1), frozen and always in eval mode.

    :param weights: ``pretrained`` reads the VGG16 backbone from :func:`vgg16_weights_path` (an error says where to
        put the file when it is absent); ``random`` keeps a random backbone (tests only).
    """

    def __init__(self, use_dropout: bool = True,
                 weights: str | PerceptualWeights = PerceptualWeights.PRETRAINED) -> None:
        super().__init__()
        weights = PerceptualWeights.parse(weights)
        self.scaling_layer = ScalingLayer()
        self.chns = list(_CHANNELS)
        self.net = VGG16Features()
        for k, c in enumerate(self.chns):
            setattr(self, f"lin{k}", NetLinLayer(c, use_dropout=use_dropout))
        self._load(weights)
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def _load(self, weights: PerceptualWeights) -> None:
        on_meta = self.lin0.model[-1].weight.is_meta
        heads = lpips_heads_path()
        if weights is PerceptualWeights.PRETRAINED:
            vgg = vgg16_weights_path()
            if not vgg.is_file():
                raise FileNotFoundError(
                    f"LPIPS needs the ImageNet VGG16 weights at {vgg} (torchvision's {VGG16_FILENAME}, from "
                    f"{VGG16_URL}); nothing is downloaded at run time. Put the file there (or point TORCH_HOME at a "
                    f"directory whose checkpoints/ holds it), or set `perceptual_weights: random` in the loss config "
                    f"to train with a randomly initialised backbone (for tests only).")
            if not on_meta:
                self.net.load_torchvision(load_state_dict(vgg))
                logger.info("LPIPS: loaded VGG16 backbone from %s", vgg)
        else:
            logger.warning("LPIPS: randomly initialised VGG16 backbone (perceptual_weights=random); "
                           "the perceptual loss is not meaningful")
        if not heads.is_file():
            raise FileNotFoundError(f"LPIPS linear-head weights not found at {heads}; reinstall the lpips package")
        if not on_meta:
            missing, unexpected = self.load_state_dict(load_state_dict(heads), strict=False)
            if unexpected or any(k.startswith("lin") for k in missing):
                raise RuntimeError(f"{heads} does not hold the LPIPS linear heads (unexpected keys: {unexpected})")

    def train(self, mode: bool = True) -> LPIPS:
        """LPIPS stays in eval mode (no dropout in the heads), whatever mode its parent is put in."""
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Distance between two [N x 3 x H x W] images in [-1, 1]: an [N x 1 x 1 x 1] Tensor."""
        feats0 = self.net(self.scaling_layer(input))
        feats1 = self.net(self.scaling_layer(target))
        val = 0
        for k, (f0, f1) in enumerate(zip(feats0, feats1)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + spatial_average(getattr(self, f"lin{k}")(diff), keepdim=True)
        return val
