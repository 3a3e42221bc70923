"""A BSRGAN-style random degradation for blind super-resolution (Zhang et al., "Designing a Practical
Degradation Model for Deep Blind Image Super-Resolution", ICCV 2021), as the LDM super-resolution data uses it.

One call: optional 2x pre-downsampling, then in random order blur (twice; once in the light variant), a random
downsample followed by the exact resize to ``1 / sf`` of the input, Gaussian noise and JPEG, and a final JPEG.
Every random choice comes from the numpy ``Generator`` passed in, so a seed fixes the whole degradation.
Images are float arrays [H, W, 3] in [0, 1]; the output is ``(H // sf, W // sf)``.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image
from scipy import linalg, ndimage, signal

from ldm.modules.image_degradation.resize import imresize, pil_resize

_RESIZE_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.BOX)


@dataclasses.dataclass(frozen=True)
class BSRConfig:
    """The knobs that differ between the full and the light variant (values of the original code)."""

    blur_passes: int = 2
    blur_scale: float = 1.0  # the light variant shrinks the blur widths by 4
    noise_range: tuple[int, int] = (2, 25)  # Gaussian noise level range, out of 255
    jpeg_range: tuple[int, int] = (30, 95)  # JPEG quality range
    random_downsample_p: float = 0.75  # else: blur with a shifted kernel and take every sf-th pixel
    pre_downsample_p: float = 0.25  # for sf = 4: first halve the image, then degrade by 2
    jpeg_p: float = 0.9  # probability of the JPEG step inside the shuffled sequence


FULL = BSRConfig()
LIGHT = BSRConfig(blur_passes=1, blur_scale=0.25, noise_range=(1, 2), jpeg_range=(80, 95),
                  random_downsample_p=0.8)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """An isotropic Gaussian kernel [size, size] summing to one."""
    r = (np.arange(size) - (size - 1) / 2.0) ** 2
    d2 = r[:, None] + r[None, :]
    k = np.exp(-(d2 - d2.min()) / (2.0 * max(sigma, 1e-3) ** 2))  # shifted: a tiny sigma cannot underflow to 0
    return k / k.sum()


def anisotropic_gaussian_kernel(size: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """A Gaussian kernel [size, size] with eigenvalues `l1`, `l2` of its covariance, rotated by `theta`."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cov = rot @ np.diag([max(l1, 1e-2), max(l2, 1e-2)]) @ rot.T
    grid = np.arange(size) - (size - 1) / 2.0
    xy = np.stack(np.meshgrid(grid, grid, indexing="xy"), axis=-1)
    q = np.einsum("...i,ij,...j->...", xy, np.linalg.inv(cov), xy)
    k = np.exp(-0.5 * (q - q.min()))
    return k / k.sum()


def blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolves each channel of [H, W, C] with a 2-D kernel (mirrored borders, ``ndimage``'s "mirror"),
    by FFT: several times faster than direct convolution for the larger kernels."""
    kh, kw = kernel.shape
    pad = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0))
    padded = np.pad(image, pad, mode="reflect")
    return signal.fftconvolve(padded, kernel[..., None], mode="valid", axes=(0, 1))


def random_blur(image: np.ndarray, sf: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Blur with a random anisotropic or isotropic Gaussian (widths grow with the scale factor `sf`)."""
    if rng.random() < 0.5:
        wd2 = (4.0 + sf) * scale
        kernel = anisotropic_gaussian_kernel(int(rng.integers(2, 12)) + 3, rng.random() * np.pi,
                                             wd2 * rng.random(), wd2 * rng.random())
    else:
        wd = (2.0 + 0.2 * sf) * scale
        kernel = gaussian_kernel(int(rng.integers(2, 5)) + 3, wd * rng.random())
    return blur(image, kernel)


def random_resize(image: np.ndarray, out_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Resizes with a filter drawn from bilinear, bicubic and area (box)."""
    return np.clip(pil_resize(image, out_hw, _RESIZE_FILTERS[int(rng.integers(0, 3))]), 0.0, 1.0)


def shifted_kernel_downsample(image: np.ndarray, sf: int, rng: np.random.Generator) -> np.ndarray:
    """Blurs with a Gaussian shifted by ``(sf - 1) / 2`` towards the top left, then keeps every `sf`-th pixel
    (so the kept pixels sit at the centres of the sf x sf cells they represent)."""
    kernel = gaussian_kernel(25, rng.uniform(0.1, 0.6 * sf))
    shift = (sf - 1) * 0.5
    kernel = ndimage.shift(kernel, (-shift, -shift), order=1, mode="nearest")
    kernel = kernel / kernel.sum()
    return np.clip(blur(image, kernel)[::sf, ::sf], 0.0, 1.0)


def gaussian_noise(image: np.ndarray, level_range: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Adds colour, grey or channel-correlated Gaussian noise of a level drawn from `level_range` (/255)."""
    sigma = int(rng.integers(level_range[0], level_range[1] + 1)) / 255.0
    kind = rng.random()
    h, w = image.shape[:2]
    if kind > 0.6:
        noise = rng.normal(0.0, sigma, image.shape)
    elif kind < 0.4:
        noise = rng.normal(0.0, sigma, (h, w, 1))
    else:
        u = linalg.orth(rng.random((3, 3)))
        cov = np.abs(sigma ** 2 * (u.T @ np.diag(rng.random(3)) @ u))
        noise = rng.multivariate_normal(np.zeros(3), cov, (h, w))
    return np.clip(image + noise, 0.0, 1.0)


def jpeg(image: np.ndarray, quality_range: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """JPEG-compresses at a quality drawn from `quality_range` and decodes again."""
    quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with rounding."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, rng: np.random.Generator | None = None,
                               config: BSRConfig = FULL) -> np.ndarray:
    """Degrades a high-resolution image into a low-resolution one.

    :param image: uint8 [H, W, 3]; it is first cropped to multiples of `sf`.
    :param sf: the downscale factor.
    :param rng: the source of every random choice (a fresh unseeded generator when None).
    :param config: :data:`FULL` or :data:`LIGHT`.
    :return: uint8 [H // sf, W // sf, 3].
    """
    rng = rng if rng is not None else np.random.default_rng()
    h, w = image.shape[0] - image.shape[0] % sf, image.shape[1] - image.shape[1] % sf
    if h < sf or w < sf:
        raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} is smaller than the scale factor {sf}")
    out_hw = (h // sf, w // sf)
    img = image[:h, :w].astype(np.float32) / 255.0
    if sf == 4 and rng.random() < config.pre_downsample_p:
        half = (h // 2, w // 2)
        img = random_resize(img, half, rng) if rng.random() < 0.5 else np.clip(imresize(img, out_hw=half), 0, 1)
        sf = 2
    order = list(rng.permutation(6))
    i2, i3 = order.index(2), order.index(3)
    order[min(i2, i3)], order[max(i2, i3)] = 2, 3  # the random downsample precedes the exact resize
    size_before_downsample = img.shape[:2]
    for step in order:
        if step < config.blur_passes:  # steps 0 and 1: blur
            img = random_blur(img, sf, rng, config.blur_scale)
        elif step == 2:
            size_before_downsample = img.shape[:2]
            if rng.random() < config.random_downsample_p:
                f = rng.uniform(1, 2 * sf)
                small = (max(1, int(img.shape[0] / f)), max(1, int(img.shape[1] / f)))
                img = random_resize(img, small, rng)
            else:
                img = shifted_kernel_downsample(img, sf, rng)
        elif step == 3:
            target = (size_before_downsample[0] // sf, size_before_downsample[1] // sf)
            img = random_resize(img, target, rng)
        elif step == 4:
            img = gaussian_noise(img, config.noise_range, rng)
        elif step == 5 and rng.random() < config.jpeg_p:
            img = jpeg(img, config.jpeg_range, rng)
    img = jpeg(img, config.jpeg_range, rng)
    assert img.shape[:2] == out_hw, (img.shape, out_hw)
    return to_uint8(img)
