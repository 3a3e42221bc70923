"""Image sets for evaluation: folders of image files and ``.npz`` arrays, as uint8 [N x H x W x 3] batches.

A folder is read lazily in batches (50k images at 256 px do not fit in memory as one array); files that PIL
cannot decode are skipped and counted, never fatal. An ``.npz`` holds one image array (the original
``sample_diffusion.py`` writes ``arr_0``), uint8 NHWC or anything :func:`to_uint8_nhwc` understands.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NPZ_IMAGE_KEYS = ("arr_0", "images", "samples", "x")


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Converts an image batch to a uint8 [N x H x W x 3] numpy array.

    :param images: uint8 [N x H x W x C] or [N x C x H x W] (C in 1, 3, 4); or floating point, read as
        [-1, 1] when its minimum is negative (the model's output range) and as [0, 1] otherwise.
        A single image (3 dims) is treated as a batch of one.
    :return: a C-contiguous uint8 [N x H x W x 3] array (gray is repeated, alpha dropped).
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy() if images.is_floating_point() else images.cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"expected an image batch [N x H x W x C] or [N x C x H x W], got shape {arr.shape}")
    if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find the channel axis (1, 3 or 4 channels) in an image batch of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        lo = -1.0 if arr.size and arr.min() < 0 else 0.0
        arr = np.clip((arr - lo) / (1.0 - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"integer images must lie in [0, 255], got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


@dataclass
class ImageSource:
    """A set of images to evaluate: a folder (read lazily) or an in-memory uint8 [N x H x W x 3] array.

    Build one with :func:`open_images`. ``skipped`` lists the folder files that could not be decoded (it
    fills while iterating).
    """

    description: str
    files: list[Path] = field(default_factory=list)
    array: np.ndarray | None = None
    size: tuple[int, int] | None = None
    skipped: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Yields uint8 [B x H x W x 3] batches (B <= batch_size), at most `limit` images in all.

        Folder images whose size differs from the first one's raise a ValueError naming the file, unless a
        `size` (H, W) was given to :func:`open_images`; undecodable files are skipped and recorded.
        """
        if self.array is not None:
            n = len(self.array) if limit is None else min(limit, len(self.array))
            for i in range(0, n, batch_size):
                yield self.array[i:min(i + batch_size, n)]
            return
        self.skipped = []
        batch: list[np.ndarray] = []
        size, n_done = self.size, 0  # size: the resize target, else the first image's size
        for path in self.files:
            if limit is not None and n_done >= limit:
                break
            try:
                img = _read_image(path, self.size)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                logger.warning("skipping unreadable image %s (%s)", path, e)
                self.skipped.append(path)
                continue
            if size is None:
                size = img.shape[:2]
            elif img.shape[:2] != tuple(size):
                raise ValueError(f"image {path} is {img.shape[1]}x{img.shape[0]} (WxH) but earlier images in "
                                 f"{self.description} are {size[1]}x{size[0]}; pass size=(H, W) (--resize) "
                                 f"to resize all images")
            batch.append(img)
            n_done += 1
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)
        if self.skipped:
            logger.warning("%d unreadable file(s) skipped in %s", len(self.skipped), self.description)

    def fingerprint(self) -> str:
        """A hash of the image set's identity (file names, sizes and mtimes, or the array bytes)."""
        h = hashlib.sha1()
        if self.array is not None:
            h.update(repr(self.array.shape).encode())
            h.update(np.ascontiguousarray(self.array).data)
        else:
            for p in self.files:
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(repr(self.size).encode())
        return h.hexdigest()[:16]


def images_from_dataset(dataset: Any, limit: int | None = None, key: str = "image") -> np.ndarray:
    """The images of a map-style dataset as uint8 [N x H x W x 3].

    :param dataset: items are dicts whose `key` holds an [H x W x 3] image (float in [-1, 1] as the ``ldm.data``
        datasets, or uint8), or are such images themselves.
    :param limit: take at most the first `limit` items.
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"the dataset {type(dataset).__name__} is empty")
    items = [dataset[i] for i in range(n)]
    if isinstance(items[0], dict):
        if key not in items[0]:
            raise KeyError(f"dataset items of {type(dataset).__name__} have no {key!r} (keys: {sorted(items[0])})")
        items = [it[key] for it in items]
    return np.concatenate([to_uint8_nhwc(np.asarray(it)[None]) for it in items])


def list_image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_npz_images(path: str | Path, key: str | None = None) -> np.ndarray:
    """The image array of an ``.npz`` file as uint8 [N x H x W x 3].

    :param key: the array name; by default the first of ``arr_0, images, samples, x`` present, or the only array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with np.load(path) as data:
        keys = list(data.keys())
        if key is None:
            found = [k for k in NPZ_IMAGE_KEYS if k in keys]
            if not found and len(keys) == 1:
                found = keys
            if not found:
                raise KeyError(f"{path} holds arrays {keys}; none is named {list(NPZ_IMAGE_KEYS)}: pass the key "
                               f"of the image array")
            key = found[0]
        elif key not in keys:
            raise KeyError(f"{path} has no array {key!r} (it holds {keys})")
        return to_uint8_nhwc(data[key])


def open_images(source: str | Path | np.ndarray | torch.Tensor, size: Sequence[int] | None = None) -> ImageSource:
    """An :class:`ImageSource` for a folder, an ``.npz`` file or an image array.

    :param source: a folder of images, an ``.npz`` file, or an array accepted by :func:`to_uint8_nhwc`.
    :param size: optional (H, W) to which folder images are resized (bicubic).
    """
    hw = None if size is None else (int(size[0]), int(size[1]))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ImageSource(description="an image array", array=to_uint8_nhwc(source), size=hw)
    path = Path(source)
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
        return ImageSource(description=str(path), files=files, size=hw)
    if path.suffix == ".npz":
        return ImageSource(description=str(path), array=load_npz_images(path), size=hw)
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path} (expected a folder or an .npz file)")
    raise ValueError(f"unsupported image source {path}: expected a folder of images or an .npz file")
