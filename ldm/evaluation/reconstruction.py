"""Reconstruction metrics of a first-stage model: PSNR, SSIM, LPIPS and rFID over a dataset.

Images are [N x 3 x H x W] float Tensors in [-1, 1] (the models' range) unless stated otherwise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm.auto import tqdm

from ldm.checkpoint import load_state_dict
from ldm.evaluation.features import FeatureStats
from ldm.evaluation.fid import Score, fid_from_stats
from ldm.evaluation.inception import FeatureExtractor

logger = logging.getLogger(__name__)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR, 10 log10(data_range^2 / MSE), in dB.

    :param x: [N x C x H x W]; :param y: same shape. :return: [N] float64 (inf for identical images).
    """
    if x.shape != y.shape:
        raise ValueError(f"PSNR needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03.

    Equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=-1)``: per-channel SSIM maps averaged
    over the valid (un-padded) region and over the channels.

    :param x: [N x C x H x W] with H, W >= 11; :param y: same shape. :return: [N] float64.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two [N x C x H x W] batches of one shape, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    w = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


def vgg16_cache_path() -> Path:
    """Where torchvision's ImageNet VGG16 weights (the LPIPS backbone) are looked up: the torch hub cache."""
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_lpips(random_backbone: bool = False) -> nn.Module:
    """LPIPS (Zhang et al. 2018, VGG variant) from the `lpips` package, with no download.

    The linear heads ship with the package; the VGG16 backbone is read from :func:`vgg16_cache_path`.

    :param random_backbone: use a randomly initialised backbone (``pnet_rand``); for tests only.
    :raises FileNotFoundError: naming the missing VGG16 file, unless `random_backbone`.
    """
    import lpips

    vgg_path = vgg16_cache_path()
    if not random_backbone and not vgg_path.is_file():
        raise FileNotFoundError(f"LPIPS needs torchvision's VGG16 weights at {vgg_path} (from "
                                f"{torchvision.models.VGG16_Weights.IMAGENET1K_V1.url}); nothing is downloaded at "
                                f"run time. Put the file there, or skip LPIPS.")
    model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    model.load_state_dict(load_state_dict(heads), strict=False)
    if not random_backbone:
        load_vgg_backbone(model, load_state_dict(vgg_path))
    else:
        logger.warning("LPIPS with a randomly initialised VGG16 backbone: the numbers are not meaningful")
    return model.eval().requires_grad_(False)


def load_vgg_backbone(model: nn.Module, vgg_state_dict: dict[str, torch.Tensor]) -> None:
    """Copies torchvision VGG16 weights (``features.{i}.weight``/``bias``) into an ``lpips.LPIPS`` VGG backbone,
    whose slices keep torchvision's layer indices as child names."""
    for k in range(1, model.net.N_slices + 1):
        for idx, layer in getattr(model.net, f"slice{k}").named_children():
            params = {name: vgg_state_dict[f"features.{idx}.{name}"] for name, _ in layer.named_parameters()}
            if params:
                layer.load_state_dict(params)


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encodes and decodes [N x 3 x H x W] images in [-1, 1] deterministically.

    Works with ``AutoencoderKL`` (the posterior's mode), ``VQModel`` (``encode`` returns the quantised code
    first), ``VQModelInterface`` (``decode`` quantises) and any module with ``encode``/``decode``.
    """
    enc = model.encode(x)
    if hasattr(enc, "mode"):
        z = enc.mode()
    elif isinstance(enc, (tuple, list)):
        z = enc[0]
    else:
        z = enc
    return model.decode(z)


@dataclass
class ReconstructionResult:
    """Mean PSNR (dB, on [0, 1] images), SSIM, LPIPS (None when not computed) and rFID over n images."""

    psnr: float
    ssim: float
    lpips: float | None
    rfid: Score | None
    n: int


def evaluate_reconstruction(model: nn.Module, batches: Iterable[torch.Tensor],
                            extractor: FeatureExtractor | None = None, lpips_model: nn.Module | None = None,
                            max_images: int | None = None, progress: bool | None = None) -> ReconstructionResult:
    """PSNR/SSIM/LPIPS of the model's reconstructions, and rFID between the inputs and the reconstructions.

    :param batches: [B x 3 x H x W] float Tensors in [-1, 1]; moved to the model's device.
    :param extractor: the Inception extractor for rFID (None: no rFID).
    :param lpips_model: from :func:`load_lpips` (None: no LPIPS).
    """
    device = next(model.parameters()).device
    psnrs, ssims, lp, real_f, fake_f = [], [], [], [], []
    n = 0
    for x in tqdm(batches, desc="reconstructions", unit="batch", disable=None if progress is None else not progress):
        if max_images is not None and n >= max_images:
            break
        if max_images is not None:
            x = x[:max_images - n]
        x = x.to(device, torch.float32)
        rec = reconstruct(model, x).clamp(-1, 1).float()
        x01, rec01 = (x + 1) / 2, (rec + 1) / 2
        psnrs.append(psnr(rec01, x01).cpu())
        ssims.append(ssim(rec01, x01).cpu())
        if lpips_model is not None:
            lp.append(lpips_model.to(device)(rec, x).flatten().double().cpu())
        if extractor is not None:
            real_f.append(extractor(_to_uint8(x01)).features.float().cpu())
            fake_f.append(extractor(_to_uint8(rec01)).features.float().cpu())
        n += x.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate the reconstructions on")
    rfid = None
    if extractor is not None and n >= 2:
        rfid = fid_from_stats(FeatureStats.from_features(torch.cat(fake_f).numpy(), extractor.name),
                              FeatureStats.from_features(torch.cat(real_f).numpy(), extractor.name))
        rfid = Score(float(rfid), "rFID", rfid.extractor)
    return ReconstructionResult(psnr=torch.cat(psnrs).mean().item(),
                                ssim=torch.cat(ssims).mean().item(),
                                lpips=torch.cat(lp).mean().item() if lp else None, rfid=rfid, n=n)


def _to_uint8(x01: torch.Tensor) -> torch.Tensor:
    """[N x C x H x W] in [0, 1] -> uint8, rounded."""
    return (x01.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def batches_from_arrays(images: np.ndarray, batch_size: int) -> Iterable[torch.Tensor]:
    """uint8 [N x H x W x 3] images as [B x 3 x H x W] float batches in [-1, 1]."""
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
