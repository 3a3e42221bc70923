"""Resizing of float images: MATLAB-style bicubic ``imresize`` and Pillow filters on float channels.

Images are numpy arrays [H, W] or [H, W, C] (any float range; callers clip).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import sparse


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's and Pillow's bicubic)."""
    ax = np.abs(x)
    ax2, ax3 = ax ** 2, ax ** 3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_matrix(in_len: int, out_len: int, antialias: bool = True) -> np.ndarray:
    """The [out_len, in_len] matrix of MATLAB's bicubic ``imresize`` along one axis (symmetric borders).

    When shrinking with `antialias`, the kernel is stretched by ``in_len / out_len`` (a low-pass filter).
    """
    scale = out_len / in_len
    stretch = scale < 1 and antialias
    width = 4.0 / scale if stretch else 4.0
    centres = (np.arange(1, out_len + 1) / scale) + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    left = np.floor(centres - width / 2)
    taps = left[:, None] + np.arange(math.ceil(width) + 2)[None]
    dist = centres[:, None] - taps
    weights = scale * _cubic(dist * scale) if stretch else _cubic(dist)
    weights = weights / weights.sum(axis=1, keepdims=True)
    idx = taps.astype(np.int64) - 1  # 0-based, then mirror into [0, in_len)
    period = 2 * in_len
    idx = np.mod(idx, period)
    idx = np.where(idx >= in_len, period - 1 - idx, idx)
    matrix = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_len), taps.shape[1]), idx.ravel()), weights.ravel())
    return matrix


def imresize(image: np.ndarray, scale: float | None = None, out_hw: tuple[int, int] | None = None,
             antialias: bool = True) -> np.ndarray:
    """MATLAB ``imresize(image, scale, 'bicubic')``: output side ``ceil(side * scale)`` unless `out_hw` is given.

    :param image: float array [H, W] or [H, W, C].
    :return: float64 array [H', W'] or [H', W', C].
    """
    h, w = image.shape[:2]
    if out_hw is None:
        if scale is None or scale <= 0:
            raise ValueError(f"imresize needs a positive scale or out_hw, got scale={scale}")
        out_hw = (math.ceil(h * scale), math.ceil(w * scale))
    # sparse: each output pixel has a few taps, and small dense products spend their time in BLAS threading
    rows = sparse.csr_matrix(resize_matrix(h, out_hw[0], antialias))
    cols = sparse.csr_matrix(resize_matrix(w, out_hw[1], antialias))
    arr = np.asarray(image, dtype=np.float64)
    flat = arr.reshape(h, w, -1)
    out = (rows @ flat.reshape(h, -1)).reshape(out_hw[0], w, -1)  # [H', W, C]
    out = (cols @ out.transpose(1, 0, 2).reshape(w, -1)).reshape(out_hw[1], out_hw[0], -1)  # [W', H', C]
    out = out.transpose(1, 0, 2)
    return out.reshape(out_hw + arr.shape[2:])

def pil_resize(image: np.ndarray, out_hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resizes each channel of a float image with a Pillow filter (antialiased when shrinking).

    :param image: float array [H, W, C].
    :return: float32 array [out_h, out_w, C].
    """
    size = (out_hw[1], out_hw[0])
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                           .resize(size, resample=resample)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)
