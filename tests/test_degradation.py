"""Super-resolution degradations: MATLAB bicubic, the seeded BSR pipeline and its parts, plain resizes."""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from ldm.modules.image_degradation import (Degradation, bicubic_degradation, degradation_fn_bsr,
                                           degradation_fn_bsr_light, degrade, imresize)
from ldm.modules.image_degradation.bsrgan import (anisotropic_gaussian_kernel, blur, gaussian_kernel,
                                                  gaussian_noise, jpeg, random_blur, shifted_kernel_downsample)
from ldm.modules.image_degradation.resize import pil_resize


def photo(side=128):
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((side, side), Image.Resampling.LANCZOS))


def high_freq_energy(img):
    """Mean squared discrete Laplacian: large for sharp images, smaller after a low-pass filter."""
    x = img.astype(np.float64)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float((lap ** 2).mean())


def test_imresize_matches_pillow_bicubic_inside_and_keeps_constants_and_ramps():
    x = photo(128).astype(np.float64) / 255.0
    small = imresize(x, 0.25)
    assert small.shape == (32, 32, 3)
    ref = pil_resize(x, (32, 32), Image.Resampling.BICUBIC)  # also a = -0.5, antialiased
    assert np.abs(small - ref)[3:-3, 3:-3].max() < 1e-5
    const = np.full((37, 41), 0.3)
    out = imresize(const, 0.5)
    assert out.shape == (19, 21) and np.allclose(out, 0.3)
    ramp = np.tile(np.arange(64.0), (8, 1))
    up = imresize(ramp, 2.0)
    # output pixel j (0-based) sits at input coordinate (j + 0.5) / 2 - 0.5; cubic reproduces linear functions
    assert np.allclose(up[:, 8:-8], (np.arange(128)[8:-8] + 0.5) / 2 - 0.5)


def test_bicubic_x4_is_a_quarter_of_the_size_and_close_to_the_image_mean():
    x = photo(128)
    lr = bicubic_degradation(x, sf=4)
    assert lr.shape == (32, 32, 3) and lr.dtype == np.uint8
    assert abs(lr.astype(float).mean() - x.astype(float).mean()) < 1.0


@pytest.mark.parametrize("fn", [degradation_fn_bsr, degradation_fn_bsr_light])
def test_bsr_is_seeded_and_sized_input_over_four(fn):
    x = photo(128)[:, :118]  # not a multiple of 4: cropped to 116
    a = fn(x, sf=4, rng=np.random.default_rng(5))["image"]
    b = fn(x, sf=4, rng=np.random.default_rng(5))["image"]
    c = fn(x, sf=4, rng=np.random.default_rng(6))["image"]
    assert a.shape == (32, 29, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert fn(photo(64), sf=2, rng=np.random.default_rng(0))["image"].shape == (32, 32, 3)


def test_bsr_outputs_stay_the_same_picture_and_light_is_lighter():
    x = photo(128)
    ref = bicubic_degradation(x, 4).astype(np.float64)
    errs = {}
    for name in ("bsrgan", "bsrgan_light"):
        outs = [degrade(x, name, 4, np.random.default_rng(s)).astype(np.float64) for s in range(6)]
        for o in outs:
            assert np.corrcoef(o.ravel(), ref.ravel())[0, 1] > 0.7
            assert abs(o.mean() - ref.mean()) < 12
        errs[name] = np.mean([np.abs(o - ref).mean() for o in outs])
    assert 0 < errs["bsrgan_light"] < errs["bsrgan"]


def test_blur_removes_high_frequencies():
    x = photo(96).astype(np.float64) / 255.0
    for seed in range(6):
        out = random_blur(x, 4, np.random.default_rng(seed))
        assert out.shape == x.shape
        assert high_freq_energy(out) < 0.9 * high_freq_energy(x)
        assert abs(out.mean() - x.mean()) < 0.01  # kernels sum to one


@pytest.mark.parametrize("size", [5, 6, 25])
def test_fft_blur_equals_direct_convolution_with_mirrored_borders(size):
    rng = np.random.default_rng(size)
    x, k = rng.random((40, 30, 3)), rng.random((size, size))
    assert np.allclose(blur(x, k), ndimage.convolve(x, k[..., None], mode="mirror"), atol=1e-12)
    assert blur(rng.random((6, 6, 3)), k).shape == (6, 6, 3)  # kernels wider than the image


@pytest.mark.parametrize("size", [5, 6, 25])
def test_kernels_stay_finite_for_tiny_widths(size):
    for k in (gaussian_kernel(size, 0.0), gaussian_kernel(size, 1e-4),
              anisotropic_gaussian_kernel(size, 0.3, 0.0, 1e-5)):
        assert np.isfinite(k).all() and np.isclose(k.sum(), 1.0)


def test_no_nan_or_overflow_over_many_seeds():
    x = photo(32)
    with np.errstate(invalid="raise", divide="raise", over="raise"):
        for seed in range(40):
            for fn in (degradation_fn_bsr, degradation_fn_bsr_light):
                assert fn(x, sf=4, rng=np.random.default_rng(seed))["image"].shape == (8, 8, 3)


def test_anisotropic_kernel_is_normalised_symmetric_and_elongated_along_theta():
    k = anisotropic_gaussian_kernel(21, theta=0.0, l1=8.0, l2=1.0)
    assert np.isclose(k.sum(), 1.0) and np.allclose(k, k[::-1, ::-1])
    grid = np.arange(21) - 10.0
    var_x = (k.sum(axis=0) * grid ** 2).sum()
    var_y = (k.sum(axis=1) * grid ** 2).sum()
    assert var_x > 4 * var_y


def test_gaussian_noise_level_is_within_the_claimed_range():
    grey = np.full((64, 64, 3), 0.5)
    stds = []
    for seed in range(20):
        noise = gaussian_noise(grey, (2, 25), np.random.default_rng(seed)) - grey
        assert abs(noise.mean()) < 0.01
        stds.append(noise.std())
    assert 1.5 / 255 < min(stds) and max(stds) < 26 / 255 and np.std(stds) > 1 / 255


def test_jpeg_is_close_at_high_quality_and_shifted_downsample_keeps_cell_centres():
    x = photo(64).astype(np.float64) / 255.0
    out = jpeg(x, (90, 95), np.random.default_rng(0))
    psnr = 10 * np.log10(1.0 / ((out - x) ** 2).mean())
    assert out.shape == x.shape and psnr > 30
    # a 4x4 block of ones at cell (2, 3) must land at output pixel (2, 3), not shifted by half a cell
    img = np.zeros((32, 32, 3))
    img[8:12, 12:16] = 1.0
    small = shifted_kernel_downsample(img, 4, np.random.default_rng(1))
    assert small.shape == (8, 8, 3) and np.unravel_index(small[..., 0].argmax(), (8, 8)) == (2, 3)


def test_plain_resize_degradations_keep_the_aspect_ratio_and_names_are_checked():
    x = photo(128)[:, :96]
    for name in ("pil_nearest", "pil_bicubic", "cv_area", "cv_lanczos"):
        assert degrade(x, name, 4).shape == (32, 24, 3)
    nearest = degrade(photo(128), "pil_nearest", 4)
    assert np.isin(nearest.reshape(-1, 3)[:, 0], photo(128)[..., 0]).all()  # only original values
    assert {d.value for d in Degradation} >= {"bsrgan", "bsrgan_light", "bicubic", "cv_nearest", "pil_nearest"}
    with pytest.raises(ValueError, match="bsrgan_light"):
        degrade(x, "bsrgan-lite", 4)
