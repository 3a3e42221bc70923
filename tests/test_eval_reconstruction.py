"""PSNR and SSIM against hand computation and scikit-image; LPIPS loading; reconstruction evaluation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from ldm.evaluation.reconstruction import (batches_from_arrays, evaluate_reconstruction, load_lpips,
                                           load_vgg_backbone, psnr, reconstruct, ssim)


def test_psnr_matches_hand_computation():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1           # MSE 0.01 -> 20 dB on [0, 1]
    y[1, 0, 0, 0] = 1.0   # MSE 1/48
    out = psnr(y, x, data_range=1.0)
    assert out[0].item() == pytest.approx(20.0, rel=1e-6)
    assert out[1].item() == pytest.approx(10 * math.log10(48.0), rel=1e-9)
    assert psnr(y * 255, x * 255, data_range=255.0)[0].item() == pytest.approx(20.0, rel=1e-6)
    assert math.isinf(psnr(x, x)[0].item())


@pytest.mark.parametrize("shape", [(24, 20), (11, 16)])
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(2, 3, *shape))
    b = np.clip(a + rng.normal(scale=0.1, size=a.shape), 0, 1)
    b[1] = np.clip(0.5 * a[1] + 0.2, 0, 1)
    ours = ssim(torch.from_numpy(b), torch.from_numpy(a), data_range=1.0).numpy()
    for i in range(2):
        ref = structural_similarity(a[i].transpose(1, 2, 0), b[i].transpose(1, 2, 0), gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)
        assert ours[i] == pytest.approx(ref, abs=1e-6)
    assert ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy() == pytest.approx(1.0, abs=1e-12)


def test_ssim_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return load_lpips(random_backbone=True)


def test_lpips_missing_backbone_names_the_file_and_random_backbone_is_a_metric(tmp_path, monkeypatch, random_lpips):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16"):
        load_lpips()
    model = random_lpips
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model(x, x).abs().max().item() < 1e-6
    assert (model(x, y).flatten() > 0).all()


def test_vgg_backbone_weights_land_in_the_lpips_slices(random_lpips):
    import copy

    import torchvision

    torch.manual_seed(1)
    features = torchvision.models.vgg16(weights=None).features
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    model = copy.deepcopy(random_lpips)
    load_vgg_backbone(model, sd)
    convs = [m for m in model.net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    x = torch.rand(1, 3, 32, 32)
    # The first 4 layers of torchvision's VGG equal LPIPS slice1.
    assert torch.allclose(model.net.slice1(x), features[:4](x))
    assert torch.allclose(model.net.slice5(model.net.slice4(model.net.slice3(model.net.slice2(model.net.slice1(x))))),
                          features[:30](x), atol=1e-5)


class _Posterior:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self) -> torch.Tensor:  # a KL autoencoder would add noise here: must not be used
        raise AssertionError("reconstruct must use the posterior's mode")


class _ShiftAutoencoder(nn.Module):
    """A fake KL autoencoder: encode -> posterior with mode x, decode -> x + shift."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift), requires_grad=False)

    def encode(self, x):
        return _Posterior(x)

    def decode(self, z):
        return z + self.shift


class _VQLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return -x, torch.zeros(()), None

    def decode(self, z):
        return -z


def test_reconstruct_uses_posterior_mode_and_vq_tuples():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(reconstruct(_ShiftAutoencoder(0.0), x), x)
    assert torch.equal(reconstruct(_VQLike(), x), x)


def test_evaluate_reconstruction_numbers():
    rng = np.random.default_rng(1)
    images = rng.integers(30, 220, size=(6, 16, 16, 3), dtype=np.uint8)
    shift = 0.2  # in [-1, 1] units -> 0.1 in [0, 1] units -> PSNR 20 dB (no clipping: pixels stay inside)
    res = evaluate_reconstruction(_ShiftAutoencoder(shift), batches_from_arrays(images, 4), progress=False)
    assert res.n == 6 and res.lpips is None and res.rfid is None
    assert res.psnr == pytest.approx(20.0, abs=1e-3)
    x01 = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    assert res.ssim == pytest.approx(ssim(x01 + 0.1, x01).mean().item(), abs=1e-5)
    limited = evaluate_reconstruction(_ShiftAutoencoder(shift), batches_from_arrays(images, 4), max_images=5,
                                      progress=False)
    assert limited.n == 5
