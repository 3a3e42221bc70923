"""LSUN churches, bedrooms and cats, from the original file lists or from a plain folder of images.

As in the original, ``LSUNChurchesTrain()`` reads ``data/lsun/church_outdoor_train.txt`` (one path per line,
relative to ``data/lsun/churches``; both relative to the working directory). When that list does not exist but
the folder does, the folder's images are used, split into train/validation by a stable hash of their paths.
Preprocessing is the original's (score-sde): centre crop to the short side, resize to `size`, random flip.
"""
from __future__ import annotations

from typing import Any

from ldm.data.base import (Interpolation, RobustImageDataset, SquareCrop, item_rng, listed_or_folder_files,
                           open_image, to_model_image)


class LSUNBase(RobustImageDataset):
    """Items: ``image`` float32 [size, size, 3] in [-1, 1], ``relative_file_path_``, ``file_path_``.

    :param txt_file: file list; default the original's for the subclass.
    :param data_root: folder the list is relative to (or the plain image folder).
    :param size: output side; None keeps the short side.
    :param interpolation: linear, bilinear, bicubic or lanczos (and the others of :class:`Interpolation`).
    :param flip_p: horizontal flip probability (default 0.5 for train, 0 for validation).
    :param val_fraction: share of a plain folder held out for validation.
    :param min_image_size: smaller images are skipped and counted.
    :param seed: None: fresh random flips; an int: fixed per index.
    """

    TXT_FILE: str | None = None
    DATA_ROOT: str | None = None
    FLIP_P = 0.5
    VALIDATION = False

    def __init__(self, txt_file: str | None = None, data_root: str | None = None, size: int | None = None,
                 interpolation: str = "bicubic", flip_p: float | None = None, val_fraction: float = 0.05,
                 min_image_size: int = 8, seed: int | None = None) -> None:
        super().__init__()
        txt_file = txt_file if txt_file is not None else self.TXT_FILE
        data_root = data_root if data_root is not None else self.DATA_ROOT
        if data_root is None:
            raise ValueError(f"{type(self).__name__}: pass data_root (the folder of the images)")
        self.data_root, self.relpaths = listed_or_folder_files(txt_file, data_root, self.VALIDATION, val_fraction,
                                                               type(self).__name__)
        self.transform = SquareCrop(size=size, flip_p=self.FLIP_P if flip_p is None else flip_p,
                                    interpolation=Interpolation.parse(interpolation))
        self.size = size
        self.min_image_size = min_image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.relpaths)

    def load_item(self, index: int) -> dict[str, Any]:
        path = self.data_root / self.relpaths[index]
        image = open_image(path, min_image_size=self.min_image_size)
        image = self.transform(image, item_rng(self.seed, index))
        return {"relative_file_path_": self.relpaths[index], "file_path_": str(path),
                "image": to_model_image(image)}


class LSUNChurchesTrain(LSUNBase):
    TXT_FILE, DATA_ROOT = "data/lsun/church_outdoor_train.txt", "data/lsun/churches"


class LSUNChurchesValidation(LSUNBase):
    TXT_FILE, DATA_ROOT, FLIP_P, VALIDATION = "data/lsun/church_outdoor_val.txt", "data/lsun/churches", 0.0, True


class LSUNBedroomsTrain(LSUNBase):
    TXT_FILE, DATA_ROOT = "data/lsun/bedrooms_train.txt", "data/lsun/bedrooms"


class LSUNBedroomsValidation(LSUNBase):
    TXT_FILE, DATA_ROOT, FLIP_P, VALIDATION = "data/lsun/bedrooms_val.txt", "data/lsun/bedrooms", 0.0, True


class LSUNCatsTrain(LSUNBase):
    TXT_FILE, DATA_ROOT = "data/lsun/cat_train.txt", "data/lsun/cats"


class LSUNCatsValidation(LSUNBase):
    TXT_FILE, DATA_ROOT, FLIP_P, VALIDATION = "data/lsun/cat_val.txt", "data/lsun/cats", 0.0, True
