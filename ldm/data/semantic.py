"""Semantic-map datasets: images with label maps, for semantic image synthesis (taming's ``SegmentationBase``).

Each image ``<data_root>/<relpath>`` has a single-channel label map ``<segmentation_root>/<relpath>`` with the
suffix replaced by ``.png`` (pixel value = class). Both get the same crop and flip (the map with nearest
neighbour resampling); the map becomes a one-hot ``segmentation`` float32 [H, W, n_labels].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.base import (Interpolation, RobustImageDataset, SquareCrop, UnusableImage, item_rng, list_images,
                           open_image, read_file_list, require_dir, to_model_image)

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_label_map(path: Path) -> Image.Image:
    """A single-channel label map; :class:`UnusableImage` naming the file if missing, unreadable or RGB."""
    try:
        with Image.open(path) as opened:
            opened.load()
            label_map = opened.copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise UnusableImage(f"{path}: cannot read label map ({type(e).__name__}: {e})") from e
    if label_map.mode not in _LABEL_MODES:
        raise UnusableImage(f"{path}: a label map must have one channel (mode L, P or I), not {label_map.mode}")
    return label_map if label_map.mode in ("L", "P") else label_map.convert("I")


class SegmentationBase(RobustImageDataset):
    """Items: ``image`` float32 [size, size, 3] in [-1, 1], ``segmentation`` float32 [size, size, n_labels]
    one-hot, ``relative_file_path_``, ``file_path_``, ``segmentation_path_``.

    :param data_csv: list of image paths relative to `data_root` (None: every image under `data_root`).
    :param data_root: image folder.
    :param segmentation_root: label-map folder with the same relative paths (``.png``).
    :param size: output side; None keeps the short side.
    :param random_crop: random instead of centre crop position.
    :param interpolation: the image's resampling filter (the map always uses nearest).
    :param n_labels: number of classes; larger label values make the item unusable (skipped, counted).
    :param shift_segmentation: add 1 to labels (uint8, so 255 "unlabelled" becomes 0), as taming.
    :param flip_p: horizontal flip probability.
    :param min_image_size: smaller images are skipped and counted.
    :param seed: None: fresh random crops/flips; an int: fixed per index.
    """

    def __init__(self, data_csv: str | None = None, data_root: str = "", segmentation_root: str = "",
                 size: int | None = None, random_crop: bool = False, interpolation: str = "bicubic",
                 n_labels: int = 182, shift_segmentation: bool = False, flip_p: float = 0.0,
                 min_image_size: int = 8, seed: int | None = None) -> None:
        super().__init__()
        self.data_root = require_dir(data_root, "SegmentationBase: data_root should hold the images")
        self.segmentation_root = require_dir(segmentation_root,
                                             "SegmentationBase: segmentation_root should hold the label maps")
        if data_csv is not None:
            self.relpaths = read_file_list(data_csv)
        else:
            self.relpaths = [p.relative_to(self.data_root).as_posix() for p in list_images(self.data_root)]
        if not self.relpaths:
            raise FileNotFoundError(f"SegmentationBase: no images in {self.data_root}")
        if n_labels < 1:
            raise ValueError(f"n_labels must be positive, got {n_labels}")
        self.n_labels, self.shift_segmentation = n_labels, shift_segmentation
        self.transform = SquareCrop(size=size if size and size > 0 else None, random_crop=random_crop,
                                    flip_p=flip_p, interpolation=Interpolation.parse(interpolation))
        self.min_image_size, self.seed = min_image_size, seed

    def __len__(self) -> int:
        return len(self.relpaths)

    def segmentation_path(self, relpath: str) -> Path:
        return (self.segmentation_root / relpath).with_suffix(".png")

    def load_item(self, index: int) -> dict[str, Any]:
        relpath = self.relpaths[index]
        path, seg_path = self.data_root / relpath, self.segmentation_path(relpath)
        image = open_image(path, min_image_size=self.min_image_size)
        label_map = read_label_map(seg_path)
        if label_map.size != image.size:
            raise UnusableImage(f"{seg_path}: label map is {label_map.size[0]}x{label_map.size[1]}, "
                                f"image {path} is {image.size[0]}x{image.size[1]}")
        params = self.transform.sample(image.width, image.height, item_rng(self.seed, index))
        image = self.transform.apply(image, params)
        labels = np.asarray(self.transform.apply(label_map, params, resample=Image.Resampling.NEAREST))
        if self.shift_segmentation:
            labels = (labels.astype(np.uint8) + np.uint8(1)).astype(np.uint8)
        if labels.max(initial=0) >= self.n_labels or labels.min(initial=0) < 0:
            raise UnusableImage(f"{seg_path}: label {int(labels.max())} is outside [0, n_labels={self.n_labels})")
        onehot = np.eye(self.n_labels, dtype=np.float32)[labels.astype(np.int64)]
        return {"image": to_model_image(image), "segmentation": onehot, "relative_file_path_": relpath,
                "file_path_": str(path), "segmentation_path_": str(seg_path)}
