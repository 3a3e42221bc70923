"""Images with bounding-box layouts from COCO-style instance JSON, for layout-to-image LDMs.

Each item is a square crop of an image (centre or random, optionally scaled and mirrored, as
:class:`ldm.data.base.SquareCrop`) with its boxes moved along: boxes are clipped to the crop, boxes whose visible
part is smaller than ``min_box_size`` output pixels are dropped, and the rest are tokenised by
:class:`ldm.data.layout.LayoutTokenizer` into ``coordinates_bbox`` (the key the released layout model reads).
With ``encode_crop`` (the default, as the original) the boxes stay in the frame of the whole image and the crop is
appended; without it they are in the frame of the crop.

Where the original taming-transformers builder differs: it kept every box that touched the crop unclipped and
dropped the whole image when it had more than ``max_objects`` boxes; here boxes are clipped to what the picture
shows and an image with more visible boxes keeps the ``max_objects`` largest.
"""
from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ldm.data.base import (CropParams, Interpolation, RobustImageDataset, SquareCrop, item_rng, open_image,
                           require_dir, to_model_image)
from ldm.data.layout import FULL_CROP, Layout, LayoutTokenizer
from ldm.data.layout_json import CrowdBoxes, ImageLayout, LayoutFileError, read_class_names, read_layout_file
from ldm.util import parse_enum

logger = logging.getLogger(__name__)


class MissingImages(enum.Enum):
    """An image the annotation file lists but that is not on disk: leave it out (counted in ``missing``) or stop."""

    SKIP = "skip"
    ERROR = "error"


def crop_boxes(boxes: torch.Tensor, image_size: tuple[int, int], crop: CropParams, out_size: int | None,
               min_box_size: float, encode_crop: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[float, ...]]:
    """Moves pixel boxes along with a square crop (and mirror) of their image.

    :param boxes: a [K x 4] Tensor of corners (x0, y0, x1, y1) in pixels of the image.
    :param image_size: (width, height) of the image.
    :param crop: the crop box in pixels and whether the crop is mirrored.
    :param out_size: side of the output picture (None: the crop's own side).
    :param min_box_size: boxes whose clipped width or height is below this many output pixels are dropped.
    :param encode_crop: return boxes in the frame of the whole image and the crop in it (else in the crop's frame
        and ``FULL_CROP``).
    :return: the kept boxes as a [K' x 4] Tensor in [0, 1], the indices of the kept boxes ([K'] long), the crop.
    """
    W, H = image_size
    left, top, right, bottom = (float(v) for v in crop.box)
    lo = torch.tensor([left, top, left, top], dtype=torch.float64)
    hi = torch.tensor([right, bottom, right, bottom], dtype=torch.float64)
    clipped = torch.minimum(torch.maximum(boxes.double().reshape(-1, 4), lo), hi)
    scale = (out_size / (right - left)) if out_size else 1.0
    wh = (clipped[:, 2:] - clipped[:, :2]) * scale
    keep = ((wh > 0).all(dim=1) & (wh >= min_box_size).all(dim=1)).nonzero().reshape(-1)
    clipped = clipped[keep]
    if encode_crop:
        norm = torch.tensor([W, H, W, H], dtype=torch.float64)
        out, frame = clipped / norm, (left / W, top / H, right / W, bottom / H)
    else:
        size = torch.tensor([right - left, bottom - top] * 2, dtype=torch.float64)
        out, frame = (clipped - lo) / size, FULL_CROP
    if crop.flip:
        out = torch.stack([1.0 - out[:, 2], out[:, 1], 1.0 - out[:, 0], out[:, 3]], dim=1)
        frame = (1.0 - frame[2], frame[1], 1.0 - frame[0], frame[3])
    return out.clamp(0.0, 1.0).float(), keep, frame


class CocoLayoutDataset(RobustImageDataset):
    """Images and their bounding-box layouts from a COCO-style instance JSON file.

    Items: ``image`` float32 [size, size, 3] in [-1, 1]; ``<key>`` (default ``coordinates_bbox``) a
    [tokenizer.seq_len] long Tensor; ``file_path_``; ``image_id`` (str).

    :param annotation_file: the instance JSON (see :mod:`ldm.data.layout_json` for the format and its errors).
    :param image_root: folder that the images' ``file_name`` are relative to.
    :param size: output side in pixels (None: the crop's own side).
    :param random_crop: random instead of centre crop position.
    :param min_crop_f: smallest crop side as a fraction of the short side.
    :param max_crop_f: largest crop side as a fraction of the short side.
    :param flip_p: probability of a horizontal mirror (boxes and crop are mirrored too).
    :param class_names: the classes and their order (class id = index): a list or a text file with one name per
        line; annotations of other categories are left out. Default: all the file's categories, in file order.
    :param normalized_boxes: the file's boxes are fractions of the image in [0, 1] (else pixels, as COCO).
    :param crowd: ``skip`` crowd boxes, keep them flagged as ``group`` (class token + num_classes, as the
        original's ``use_group_parameter``), or ``keep`` them as plain boxes.
    :param min_box_size: drop boxes whose visible part is narrower or lower than this many output pixels.
    :param min_objects: leave out images with fewer boxes than this (before cropping).
    :param max_objects: objects per token sequence; an image with more visible boxes keeps the largest.
    :param vocab_size: vocabulary of the conditioner (8192 for the released model).
    :param encode_crop: append the crop to the tokens (boxes then in the whole image's frame), as the original.
    :param shuffle_objects: random object order in the tokens (the original shuffled); else file order.
    :param missing_images: ``skip`` images that are not on disk (counted in ``missing``) or raise (``error``).
    :param min_image_size: images with a shorter side are skipped when read (and counted in ``skipped``).
    :param interpolation: resampling filter name.
    :param seed: None: fresh random crops/flips/orders (training); an int: the same per index.
    :param key: the batch key of the tokens.
    """

    def __init__(self, annotation_file: str | Path, image_root: str | Path, size: int | None = 256,
                 random_crop: bool = False, min_crop_f: float = 1.0, max_crop_f: float = 1.0, flip_p: float = 0.0,
                 class_names: str | Path | Sequence[str] | None = None, normalized_boxes: bool = False,
                 crowd: str = "skip", min_box_size: float = 2.0, min_objects: int = 1, max_objects: int = 30,
                 vocab_size: int = 8192, encode_crop: bool = True, shuffle_objects: bool = False,
                 missing_images: str = "skip", min_image_size: int = 8, interpolation: str = "bicubic",
                 seed: int | None = None, key: str = "coordinates_bbox") -> None:
        super().__init__()
        crowd_mode = CrowdBoxes.parse(crowd)
        self.missing_policy = parse_enum(MissingImages, missing_images, "missing_images")
        if min_box_size < 0 or min_objects < 0:
            raise ValueError(f"min_box_size and min_objects must be >= 0, got {min_box_size} and {min_objects}")
        self.annotation_file = Path(annotation_file).expanduser()
        self.image_root = require_dir(image_root, "CocoLayoutDataset image_root")
        layouts = read_layout_file(self.annotation_file, read_class_names(class_names), normalized_boxes,
                                   crowd_mode)
        self.class_names = list(layouts.class_names)
        self.tokenizer = LayoutTokenizer(len(self.class_names), vocab_size=vocab_size, max_objects=max_objects,
                                         encode_crop=encode_crop, use_group_flag=crowd_mode is CrowdBoxes.GROUP)
        self.normalized_boxes = normalized_boxes
        self.transform = SquareCrop(size=size if size and size > 0 else None, random_crop=random_crop,
                                    min_crop_f=min_crop_f, max_crop_f=max_crop_f, flip_p=flip_p,
                                    interpolation=Interpolation.parse(interpolation))
        self.min_box_size = float(min_box_size)
        self.shuffle_objects = shuffle_objects
        self.min_image_size = min_image_size
        self.seed = seed
        self.key = key
        self.missing = 0
        self.images = self._usable_images(layouts.images, min_objects)
        if not self.images:
            raise LayoutFileError(f"{self.annotation_file}: no usable images (min_objects={min_objects}, "
                                  f"{self.missing} missing under {self.image_root})")

    def _usable_images(self, images: Sequence[ImageLayout], min_objects: int) -> list[ImageLayout]:
        usable, missing = [], []
        for index, image in enumerate(images):
            if image.file_name is None:
                raise LayoutFileError(f"{self.annotation_file}: images[{index}] (id {image.image_id}) has no "
                                      f"'file_name'")
            if len(image.objects) < min_objects:
                continue
            path = self.image_root / image.file_name
            if not path.is_file():
                if self.missing_policy is MissingImages.ERROR:
                    raise FileNotFoundError(f"{self.annotation_file}: images[{index}] (id {image.image_id}): image "
                                            f"file {path} does not exist")
                missing.append(image.file_name)
                continue
            usable.append(image)
        self.missing = len(missing)
        if missing:
            logger.warning("%s: %d images listed in the file are not under %s and are left out (e.g. %s)",
                           self.annotation_file, len(missing), self.image_root, ", ".join(missing[:3]))
        return usable

    def __len__(self) -> int:
        return len(self.images)

    def layout(self, index: int, image_size: tuple[int, int], crop: CropParams,
               rng: np.random.Generator) -> Layout:
        """The layout of item `index` for an image of `image_size` (width, height) cut by `crop`."""
        record = self.images[index]
        objects = record.objects
        boxes = torch.tensor([o.box for o in objects], dtype=torch.float64).reshape(-1, 4)
        W, H = image_size
        if self.normalized_boxes:
            boxes = boxes * torch.tensor([W, H, W, H], dtype=torch.float64)
        elif (record.width, record.height) != (W, H):  # a resized copy of the images: scale the boxes along
            boxes = boxes * torch.tensor([W / record.width, H / record.height] * 2, dtype=torch.float64)
        out, keep, frame = crop_boxes(boxes, image_size, crop, self.transform.size, self.min_box_size,
                                      self.tokenizer.encode_crop)
        order = keep.tolist()
        if len(order) > self.tokenizer.max_objects:
            area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
            largest = torch.argsort(area, descending=True, stable=True)[:self.tokenizer.max_objects]
            largest = largest.sort().values
            out, order = out[largest], [order[i] for i in largest.tolist()]
        if self.shuffle_objects and len(order) > 1:
            perm = torch.from_numpy(rng.permutation(len(order)))
            out, order = out[perm], [order[i] for i in perm.tolist()]
        class_ids = torch.tensor([objects[i].class_id for i in order], dtype=torch.long)
        group = torch.tensor([objects[i].group for i in order], dtype=torch.bool)
        return Layout(out, class_ids, group, frame)

    def load_item(self, index: int) -> dict[str, Any]:
        record = self.images[index]
        path = self.image_root / str(record.file_name)
        image = open_image(path, min_image_size=self.min_image_size)
        rng = item_rng(self.seed, index)
        crop = self.transform.sample(image.width, image.height, rng)
        layout = self.layout(index, image.size, crop, rng)
        return {"image": to_model_image(self.transform.apply(image, crop)),
                self.key: self.tokenizer.encode_layout(layout),
                "file_path_": str(path),
                "image_id": record.image_id}
