"""Shared pieces of the datasets: robust image loading, square crop/resize/flip, and image-path datasets.

Loading (:func:`open_image`) applies the EXIF orientation and converts every mode to RGB (grayscale, palette,
CMYK, 16-bit; transparency is composited on a background, white by default). A file that cannot be used
(corrupt, truncated, smaller than ``min_image_size``) raises :class:`UnusableImage`; map-style datasets built on
:class:`RobustImageDataset` then log it, count it in ``dataset.skipped`` and return the next usable item, so a
bad file never stops a run. Counts are per process (each DataLoader worker counts its own).

Outputs follow the original code: ``image`` is float32 HWC in [-1, 1] (numpy).
"""
from __future__ import annotations

import dataclasses
import enum
import io
import logging
import zlib
from abc import abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from ldm.util import parse_enum

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
ARRAY_EXTENSIONS = frozenset({".npy"})  # uint8 image arrays (CelebA-HQ); listed only where asked for
WHITE = (255, 255, 255)


class UnusableImage(ValueError):
    """An image that cannot be used (unreadable, truncated, too small); the message names the file."""


class Interpolation(enum.Enum):
    """Resampling filters by the names the original configs use (``cv2``-style names map to Pillow's)."""

    NEAREST = "nearest"
    LINEAR = "linear"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    AREA = "area"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

    @classmethod
    def parse(cls, name: str | Interpolation) -> Interpolation:
        return parse_enum(cls, name, "interpolation")

    @property
    def pil(self) -> Image.Resampling:
        R = Image.Resampling
        return {"nearest": R.NEAREST, "linear": R.BILINEAR, "bilinear": R.BILINEAR, "bicubic": R.BICUBIC,
                "area": R.BOX, "box": R.BOX, "hamming": R.HAMMING, "lanczos": R.LANCZOS}[self.value]


def to_rgb(image: Image.Image, background: Sequence[int] = WHITE) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels are composited on `background` (RGB, 0-255)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth grey
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def _array_to_image(arr: np.ndarray, name: str) -> Image.Image:
    """A uint8 array [1, 3, H, W], [3, H, W], [H, W, 3] or [H, W] (the CelebA-HQ .npy layout and others)."""
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise UnusableImage(f"{name}: array of shape {arr.shape} is not an image")
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def open_image(source: str | Path | bytes | BinaryIO, min_image_size: int = 1,
               background: Sequence[int] = WHITE, name: str | None = None) -> Image.Image:
    """Reads an image file (path, bytes or file object) as an upright RGB Pillow image.

    :raises UnusableImage: naming the file, when it is corrupt, truncated or smaller than `min_image_size`.
    """
    name = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    try:
        if isinstance(source, (str, Path)) and str(source).lower().endswith(".npy"):
            image = _array_to_image(np.load(source, allow_pickle=False), name)
        else:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        image = to_rgb(image, background)
    except UnusableImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnusableImage(f"{name}: cannot read image ({type(e).__name__}: {e})") from e
    if min(image.size) < min_image_size:
        raise UnusableImage(f"{name}: {image.width}x{image.height} is smaller than "
                            f"min_image_size={min_image_size}")
    return image


def to_model_image(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3] in [-1, 1], as the original datasets return."""
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


def item_rng(seed: int | None, index: int) -> np.random.Generator:
    """The generator of one item: fixed by ``(seed, index)``, or fresh from torch's generator when `seed` is
    None (torch seeds each DataLoader worker and epoch differently, and ``seed_everything`` fixes it)."""
    if seed is None:
        return np.random.default_rng(int(torch.randint(2 ** 62, ())))
    return np.random.default_rng([seed, index])


@dataclasses.dataclass(frozen=True)
class CropParams:
    """A square crop ``box`` (left, top, right, bottom) in source pixels and whether to mirror."""

    box: tuple[int, int, int, int]
    flip: bool


@dataclasses.dataclass(frozen=True)
class SquareCrop:
    """Crops a square of side ``f * min(H, W)`` with ``f ~ U(min_crop_f, max_crop_f)``, at a random or the
    centre position, resizes it to ``size`` (``None``: keep its side) and mirrors it with probability `flip_p`.

    With the defaults (``f = 1``) this is the original "rescale the short side, then centre/random crop".
    """

    size: int | None = None
    random_crop: bool = False
    min_crop_f: float = 1.0
    max_crop_f: float = 1.0
    flip_p: float = 0.0
    interpolation: Interpolation = Interpolation.BICUBIC

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_f <= self.max_crop_f <= 1.0:
            raise ValueError(f"need 0 < min_crop_f <= max_crop_f <= 1, got {self.min_crop_f}, {self.max_crop_f}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be positive or None, got {self.size}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")

    def sample(self, width: int, height: int, rng: np.random.Generator) -> CropParams:
        """Draws the crop of one image of `width` x `height`."""
        f = self.min_crop_f if self.min_crop_f == self.max_crop_f else rng.uniform(self.min_crop_f, self.max_crop_f)
        side = max(1, int(min(width, height) * f))
        if self.random_crop:
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        else:
            left, top = (width - side) // 2, (height - side) // 2
        flip = self.flip_p > 0 and rng.random() < self.flip_p
        return CropParams((left, top, left + side, top + side), bool(flip))

    def apply(self, image: Image.Image, params: CropParams, resample: Image.Resampling | None = None) -> Image.Image:
        """Crops, resizes (with `resample`, default this transform's interpolation) and mirrors `image`."""
        out = image.crop(params.box)
        if self.size is not None and out.size != (self.size, self.size):
            out = out.resize((self.size, self.size), resample=self.interpolation.pil if resample is None else resample,
                             reducing_gap=None)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else out

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(image, self.sample(image.width, image.height, rng))


def require_dir(path: str | Path, what: str) -> Path:
    """`path` as a Path; a FileNotFoundError naming it and `what` (the expected layout) when it is no folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(f"{what}: folder {p}{where} does not exist")
    return p


def list_images(root: str | Path, recursive: bool = True,
                extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under `root` (by extension, case-insensitive), sorted for a stable order."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(root).glob(pattern) if p.suffix.lower() in extensions and p.is_file())


def read_file_list(txt_file: str | Path) -> list[str]:
    """Non-empty lines of a file list (one relative path per line)."""
    with open(txt_file, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def in_validation_split(relpath: str, val_fraction: float) -> bool:
    """A stable hold-out: a file belongs to validation iff a hash of its relative path says so (adding files
    never moves others between splits)."""
    return zlib.crc32(relpath.encode("utf-8")) % 10_000 < round(val_fraction * 10_000)


def listed_or_folder_files(txt_file: str | Path | None, data_root: str | Path, validation: bool,
                           val_fraction: float, what: str,
                           extensions: frozenset[str] = IMAGE_EXTENSIONS) -> tuple[Path, list[str]]:
    """The files of one split: the lines of `txt_file` (paths relative to `data_root`) when that file exists,
    else the images under the folder `data_root` split by :func:`in_validation_split`.

    :param what: names the dataset in errors.
    :param extensions: file suffixes a folder is searched for.
    :return: the root and the relative paths (sorted for folders, in list order for file lists).
    """
    root = Path(data_root).expanduser()
    if txt_file is not None and Path(txt_file).expanduser().is_file():
        return root, read_file_list(Path(txt_file).expanduser())
    if root.is_dir():
        rel = [p.relative_to(root).as_posix() for p in list_images(root, extensions=extensions)]
        rel = [r for r in rel if in_validation_split(r, val_fraction) == validation]
        if not rel:
            raise FileNotFoundError(f"{what}: no images for this split under {root}")
        return root, rel
    where = "" if root.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    listed = f"a file list {txt_file} (one image path per line, relative to {root}) or " if txt_file else ""
    raise FileNotFoundError(f"{what}: expected {listed}a folder of images at {root}{where}; neither exists")


class RobustImageDataset(Dataset):
    """A map-style dataset whose items may turn out unusable when read: those are logged, counted in
    ``skipped`` and replaced by the next usable item (wrapping around), up to ``max_consecutive_skips``."""

    max_consecutive_skips = 64

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_item(self, index: int) -> dict[str, Any]:
        """The item at `index`; raises :class:`UnusableImage` when its file cannot be used."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        for attempt in range(min(n, self.max_consecutive_skips)):
            try:
                return self.load_item((index + attempt) % n)
            except UnusableImage as e:
                self.skipped += 1
                logger.warning("%s: skipping %s (%d skipped so far)", type(self).__name__, e, self.skipped)
        raise RuntimeError(f"{type(self).__name__}: {min(n, self.max_consecutive_skips)} consecutive items from "
                           f"index {index} are unusable (see the warnings above); check the data")


class ImagePaths(RobustImageDataset):
    """Images from a list of paths with optional per-item labels (the taming ``ImagePaths``).

    Items: ``image`` float32 [size, size, 3] in [-1, 1], ``file_path_``, and ``labels[k][i]`` for each key.

    :param paths: image files (any format of :func:`open_image`, including ``.npy`` arrays).
    :param size: output side; None keeps the (square-cropped) side.
    :param random_crop: random instead of centre crop position.
    :param labels: per-item values, each a sequence as long as `paths`.
    :param flip_p: horizontal flip probability.
    :param interpolation: resampling filter name.
    :param min_crop_f: smallest crop side as a fraction of the short side.
    :param max_crop_f: largest crop side as a fraction of the short side.
    :param min_image_size: images with a shorter side are skipped (and counted).
    :param seed: None: fresh random crops/flips (training); an int: the same ones every time per index.
    """

    def __init__(self, paths: Sequence[str | Path], size: int | None = None, random_crop: bool = False,
                 labels: Mapping[str, Sequence[Any]] | None = None, flip_p: float = 0.0,
                 interpolation: str = "bicubic", min_crop_f: float = 1.0, max_crop_f: float = 1.0,
                 min_image_size: int = 8, seed: int | None = None) -> None:
        super().__init__()
        self.paths = [str(p) for p in paths]
        self.labels = {k: list(v) for k, v in (labels or {}).items()}
        for key, values in self.labels.items():
            if len(values) != len(self.paths):
                raise ValueError(f"label {key!r} has {len(values)} values for {len(self.paths)} paths")
        self.transform = SquareCrop(size=size if size and size > 0 else None, random_crop=random_crop,
                                    min_crop_f=min_crop_f, max_crop_f=max_crop_f, flip_p=flip_p,
                                    interpolation=Interpolation.parse(interpolation))
        self.min_image_size = min_image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def load_item(self, index: int) -> dict[str, Any]:
        image = open_image(self.paths[index], min_image_size=self.min_image_size)
        image = self.transform(image, item_rng(self.seed, index))
        example = {k: v[index] for k, v in self.labels.items()}
        example["image"] = to_model_image(image)
        example["file_path_"] = self.paths[index]
        return example


class Txt2ImgIterableBaseDataset(IterableDataset):
    """The original interface of chainable iterable text-to-image datasets (kept for configs and main.py)."""

    def __init__(self, num_records: int = 0, valid_ids: Sequence[int] | None = None, size: int = 256) -> None:
        super().__init__()
        self.num_records = num_records
        self.valid_ids = valid_ids
        self.sample_ids = valid_ids
        self.size = size
        logger.info("%s dataset contains %d examples.", type(self).__name__, num_records)

    def __len__(self) -> int:
        return self.num_records

    @abstractmethod
    def __iter__(self):
        ...
