"""Degradations that make low-resolution inputs for super-resolution training.

:class:`Degradation` names them as the original super-resolution configs do (``bsrgan``, ``bsrgan_light``,
``bicubic``, ``cv_*``, ``pil_*``); :func:`degrade` applies one. OpenCV is not a dependency: the ``cv_*``
names use the matching Pillow filter (Pillow's filters are antialiased when shrinking, OpenCV's linear and
cubic ones are not).
"""
from __future__ import annotations

import enum
import functools

import numpy as np
from PIL import Image

from ldm.modules.image_degradation.bsrgan import (
    FULL,
    LIGHT,
    BSRConfig,
    degradation_bsrgan_variant,
    to_uint8,
)
from ldm.modules.image_degradation.resize import imresize
from ldm.util import parse_enum

__all__ = ["Degradation", "degrade", "bicubic_degradation", "degradation_bsrgan_variant", "degradation_fn_bsr",
           "degradation_fn_bsr_light", "imresize", "BSRConfig", "FULL", "LIGHT"]


class Degradation(enum.Enum):
    BSRGAN = "bsrgan"
    BSRGAN_LIGHT = "bsrgan_light"
    BICUBIC = "bicubic"  # MATLAB-style antialiased bicubic, the classic "bicubic x4"
    CV_NEAREST = "cv_nearest"
    CV_BILINEAR = "cv_bilinear"
    CV_BICUBIC = "cv_bicubic"
    CV_AREA = "cv_area"
    CV_LANCZOS = "cv_lanczos"
    PIL_NEAREST = "pil_nearest"
    PIL_BILINEAR = "pil_bilinear"
    PIL_BICUBIC = "pil_bicubic"
    PIL_BOX = "pil_box"
    PIL_HAMMING = "pil_hamming"
    PIL_LANCZOS = "pil_lanczos"

    @classmethod
    def parse(cls, name: str | Degradation) -> Degradation:
        return parse_enum(cls, name, "degradation")

    @property
    def is_random(self) -> bool:
        return self in (Degradation.BSRGAN, Degradation.BSRGAN_LIGHT)

    @property
    def pil_filter(self) -> Image.Resampling:
        """The Pillow filter of a plain-resize degradation."""
        R = Image.Resampling
        return {"nearest": R.NEAREST, "bilinear": R.BILINEAR, "bicubic": R.BICUBIC, "area": R.BOX, "box": R.BOX,
                "hamming": R.HAMMING, "lanczos": R.LANCZOS}[self.value.split("_", 1)[1]]


def bicubic_degradation(image: np.ndarray, sf: int = 4) -> np.ndarray:
    """MATLAB-style bicubic downscaling by `sf` of uint8 [H, W, 3] -> uint8 [ceil(H / sf), ceil(W / sf), 3]."""
    return to_uint8(imresize(image.astype(np.float64) / 255.0, scale=1.0 / sf))


def degrade(image: np.ndarray, degradation: str | Degradation, sf: int = 4,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Makes the low-resolution input of a uint8 [H, W, 3] image.

    :param rng: used by the random degradations (``bsrgan``, ``bsrgan_light``) only.
    :return: uint8 [H // sf, W // sf, 3] (``ceil`` for ``bicubic``; the short side is ``side // sf`` for the
        plain resizes, whose long side keeps the aspect ratio, as the original's ``SmallestMaxSize``).
    """
    kind = Degradation.parse(degradation)
    if kind is Degradation.BSRGAN:
        return degradation_bsrgan_variant(image, sf=sf, rng=rng, config=FULL)
    if kind is Degradation.BSRGAN_LIGHT:
        return degradation_bsrgan_variant(image, sf=sf, rng=rng, config=LIGHT)
    if kind is Degradation.BICUBIC:
        return bicubic_degradation(image, sf=sf)
    h, w = image.shape[:2]
    short = min(h, w) // sf
    out_hw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    small = Image.fromarray(image).resize((out_hw[1], out_hw[0]), resample=kind.pil_filter)
    return np.asarray(small)


def _original_interface(config: BSRConfig):
    """``fn(image, sf=4, rng=None) -> {"image": uint8 LR}``, the return format of the original functions."""

    @functools.wraps(degradation_bsrgan_variant)
    def fn(image: np.ndarray, sf: int = 4, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        return {"image": degradation_bsrgan_variant(image, sf=sf, rng=rng, config=config)}

    return fn


degradation_fn_bsr = _original_interface(FULL)
degradation_fn_bsr_light = _original_interface(LIGHT)
