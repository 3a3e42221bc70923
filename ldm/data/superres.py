"""Super-resolution pairs (``image``, ``LR_image``) from any folder of images.

This stands in for the unpublished ``ldm.data.openimages.SuperresOpenImagesAdvancedTrain/Validation`` of the
``bsr_sr`` config (OpenImages or any other photos, e.g. DIV2K): point ``root`` at the images and keep the
config's ``size``, ``degradation``, ``downscale_f``, ``min_crop_f``, ``max_crop_f`` and ``random_crop``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ldm.data.base import (Interpolation, RobustImageDataset, SquareCrop, item_rng, list_images, open_image,
                           require_dir, to_model_image)
from ldm.modules.image_degradation import Degradation, degrade


def sr_pair(image: Image.Image, crop: SquareCrop, degradation: Degradation, downscale_f: int,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crops and resizes `image` with `crop`, then degrades it by `downscale_f`.

    :return: ``image`` float32 [size, size, 3] and ``LR_image`` float32 [size / f, size / f, 3], in [-1, 1].
    """
    hr = np.asarray(crop(image, rng))
    lr = degrade(hr, degradation, downscale_f, rng)
    return {"image": to_model_image(hr), "LR_image": to_model_image(lr)}


class SuperresFolderDataset(RobustImageDataset):
    """Per item: a square crop of side ``f * min(H, W)``, ``f ~ U(min_crop_f, max_crop_f)``, resized to `size`
    with area filtering, and its degraded low-resolution version. Images whose short side is below
    `min_image_size` (default `size`, so targets are never upsampled) are skipped and counted.

    :param root: folder of high-resolution images (searched recursively).
    :param degradation: a :class:`~ldm.modules.image_degradation.Degradation` name.
    :param seed: None: fresh crops and degradations; an int: fixed pairs per index (evaluation).
    """

    def __init__(self, root: str, size: int = 256, degradation: str = "bsrgan_light", downscale_f: int = 4,
                 min_crop_f: float = 0.5, max_crop_f: float = 1.0, random_crop: bool = True,
                 min_image_size: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        if not size or size % downscale_f:
            raise ValueError(f"size ({size}) must be a positive multiple of downscale_f ({downscale_f})")
        self.root = require_dir(root, "SuperresFolderDataset: root should be a folder of high-resolution images")
        self.paths = list_images(self.root)
        if not self.paths:
            raise FileNotFoundError(f"SuperresFolderDataset: no images in {self.root}")
        self.size, self.downscale_f, self.LR_size = size, downscale_f, size // downscale_f
        self.degradation = Degradation.parse(degradation)
        self.crop = SquareCrop(size=size, random_crop=random_crop, min_crop_f=min_crop_f, max_crop_f=max_crop_f,
                               interpolation=Interpolation.AREA)
        self.min_image_size = size if min_image_size is None else min_image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def load_item(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        image = open_image(path, min_image_size=self.min_image_size)
        example = sr_pair(image, self.crop, self.degradation, self.downscale_f, item_rng(self.seed, index))
        example["file_path_"] = str(path)
        return example
