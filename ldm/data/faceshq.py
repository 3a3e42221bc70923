"""CelebA-HQ and FFHQ (the taming-transformers ``faceshq`` datasets; ``taming.data.faceshq.*`` maps here).

As in taming, ``CelebAHQTrain(size)`` reads ``data/celebahqtrain.txt`` (paths relative to ``data/celebahq``;
``.npy`` arrays [1, 3, H, W] or ordinary images) and ``FFHQTrain`` reads ``data/ffhqtrain.txt`` relative to
``data/ffhq``, both relative to the working directory. Without the list, a plain folder of images at the root
is used, split into train/validation by a stable hash of the paths. Images are resized (short side) and
centre-cropped to `size`. ``FacesHQTrain``/``FacesHQValidation`` concatenate both with a ``class`` key
(0: CelebA-HQ, 1: FFHQ) and an optional random/centre ``crop_size`` crop with ``coord`` maps.
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from ldm.data.base import (ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, RobustImageDataset, SquareCrop, item_rng,
                           listed_or_folder_files, open_image, to_model_image)


class FacesBase(RobustImageDataset):
    """Items: ``image`` float32 [size, size, 3] in [-1, 1] and ``file_path_``, restricted to `keys` if given.

    :param size: output side (short side resize + centre crop); None keeps the short side.
    :param keys: the item keys to return (all when None).
    :param root: image folder; default the taming location for the subclass.
    :param file_list: list of paths relative to `root`; default the taming list for the subclass.
    :param flip_p: horizontal flip probability (taming: none).
    :param val_fraction: share of a plain folder held out for validation.
    :param min_image_size: smaller images are skipped and counted.
    :param seed: None: fresh random flips; an int: fixed per index.
    """

    ROOT = ""
    FILE_LIST = ""
    VALIDATION = False

    def __init__(self, size: int | None = None, keys: Sequence[str] | None = None, root: str | None = None,
                 file_list: str | None = None, flip_p: float = 0.0, val_fraction: float = 0.05,
                 min_image_size: int = 8, seed: int | None = None) -> None:
        super().__init__()
        self.root, self.relpaths = listed_or_folder_files(file_list or self.FILE_LIST, root or self.ROOT,
                                                          self.VALIDATION, val_fraction, type(self).__name__,
                                                          extensions=IMAGE_EXTENSIONS | ARRAY_EXTENSIONS)
        self.keys = list(keys) if keys is not None else None
        self.transform = SquareCrop(size=size, flip_p=flip_p)
        self.min_image_size = min_image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.relpaths)

    def load_item(self, index: int) -> dict[str, Any]:
        path = self.root / self.relpaths[index]
        image = self.transform(open_image(path, min_image_size=self.min_image_size), item_rng(self.seed, index))
        example = {"image": to_model_image(image), "file_path_": str(path)}
        if self.keys is None:
            return example
        missing = [k for k in self.keys if k not in example]
        if missing:
            raise KeyError(f"{type(self).__name__}: keys {missing} are not in the items {sorted(example)}")
        return {k: example[k] for k in self.keys}


class CelebAHQTrain(FacesBase):
    ROOT, FILE_LIST = "data/celebahq", "data/celebahqtrain.txt"


class CelebAHQValidation(FacesBase):
    ROOT, FILE_LIST, VALIDATION = "data/celebahq", "data/celebahqvalidation.txt", True


class FFHQTrain(FacesBase):
    ROOT, FILE_LIST = "data/ffhq", "data/ffhqtrain.txt"


class FFHQValidation(FacesBase):
    ROOT, FILE_LIST, VALIDATION = "data/ffhq", "data/ffhqvalidation.txt", True


class FacesHQTrain(Dataset):
    """CelebA-HQ (class 0) + FFHQ (class 1), random `crop_size` crops; ``coord`` adds the crop's position
    map [crop, crop, 1] with values ``(y * W + x) / (H * W)`` of the uncropped image."""

    PARTS: tuple[type[FacesBase], type[FacesBase]] = (CelebAHQTrain, FFHQTrain)
    RANDOM_CROP = True

    def __init__(self, size: int, keys: Sequence[str] | None = None, crop_size: int | None = None,
                 coord: bool = False, seed: int | None = None) -> None:
        super().__init__()
        self.parts = [part(size=size, keys=keys) for part in self.PARTS]
        self.ends = list(np.cumsum([len(p) for p in self.parts]))
        if crop_size is not None and size is not None and crop_size > size:
            raise ValueError(f"crop_size ({crop_size}) must not exceed size ({size})")
        self.crop_size, self.coord, self.seed = crop_size, coord, seed

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def skipped(self) -> int:
        """Unusable files skipped so far (in this process) by both parts."""
        return sum(p.skipped for p in self.parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        part = bisect.bisect_right(self.ends, index)
        example = dict(self.parts[part][index - (self.ends[part - 1] if part else 0)])
        if self.crop_size is not None:
            image = example["image"]
            h, w = image.shape[:2]
            c = self.crop_size
            if self.RANDOM_CROP:
                rng = item_rng(self.seed, index)
                top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            else:
                top, left = (h - c) // 2, (w - c) // 2
            example["image"] = image[top:top + c, left:left + c]
            if self.coord:
                grid = (np.arange(h * w, dtype=np.float32) / (h * w)).reshape(h, w, 1)
                example["coord"] = grid[top:top + c, left:left + c]
        example["class"] = part
        return example


class FacesHQValidation(FacesHQTrain):
    PARTS = (CelebAHQValidation, FFHQValidation)
    RANDOM_CROP = False
