"""ImageNet (ILSVRC2012) train/validation and super-resolution pairs, read from disk (never downloaded).

Layout, as the original code leaves it after preparing the archives::

    <root>/ILSVRC2012_train/data/<synset>/<file>.JPEG        (root: data_root, or
    <root>/ILSVRC2012_validation/data/<synset>/<file>.JPEG     $XDG_CACHE_HOME/autoencoders/data by default)

``data_root`` may also point straight at the ``ILSVRC2012_*`` folder or at a folder of synset sub-folders.
A ``filelist.txt`` of ``<synset>/<file>`` lines next to ``data/`` is used when present (fast for 1.28M files).
The validation images may also lie flat in ``data/`` with ``validation_synset.txt`` (``<file> <synset>`` lines)
beside it. Class index and human-readable names come with this package (``ldm/data/resources``).
"""
from __future__ import annotations

import ast
import functools
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Mapping


from ldm.data.base import (Interpolation, RobustImageDataset, SquareCrop, item_rng, open_image,
                           read_file_list, to_model_image)
from ldm.data.superres import sr_pair
from ldm.modules.image_degradation import Degradation
from ldm.util import ConfigError

_SYNSET = re.compile(r"^n\d{8}$")
_IGNORED_FILES = frozenset({"n06596364_9591.JPEG"})  # a corrupt file the original list also drops
_CONFIG_KEYS = ("size", "random_crop", "keep_orig_class_label", "sub_indices", "flip_p", "min_crop_f",
                "max_crop_f", "interpolation", "min_image_size", "seed")


@functools.lru_cache(maxsize=1)
def index_to_synset() -> tuple[str, ...]:
    """The 1000 ImageNet synsets in class-index order."""
    text = importlib.resources.files("ldm.data").joinpath("resources/index_synset.yaml").read_text()
    pairs = (line.split(":", 1) for line in text.splitlines() if line.strip())
    table = {int(k): v.strip() for k, v in pairs}
    return tuple(table[i] for i in range(len(table)))


@functools.lru_cache(maxsize=1)
def index_to_human() -> tuple[str, ...]:
    """Human-readable names of the 1000 classes, e.g. "tench, Tinca tinca"."""
    text = importlib.resources.files("ldm.data").joinpath("resources/imagenet_clsidx_to_label.txt").read_text()
    table = {}
    for line in text.splitlines():
        if line.strip():
            key, value = line.split(":", 1)
            table[int(key)] = ast.literal_eval(value.strip().rstrip(","))
    return tuple(table[i] for i in range(len(table)))


def synset_to_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(index_to_synset())}


def str_to_indices(spec: str) -> list[int]:
    """Class indices from a spec like "0-9,20,50-52" (ranges inclusive of the start, exclusive of the end as
    in the original: "0-3" is 0, 1, 2)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = (int(p) for p in part.split("-"))
            if not 0 <= lo < hi:
                raise ValueError(f"bad class range {part!r} in sub_indices {spec!r}")
            out.extend(range(lo, hi))
        elif part:
            out.append(int(part))
    return sorted(set(out))


def _has_synset_dirs(path: Path) -> bool:
    return path.is_dir() and any(_SYNSET.match(p.name) and p.is_dir() for p in path.iterdir())


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "autoencoders" / "data"


class ImageNetBase(RobustImageDataset):
    """Items: ``image`` float32 [size, size, 3] in [-1, 1] (unless ``process_images=False``), ``class_label``
    (the index among the synsets present, or the official index with ``keep_orig_class_label``),
    ``human_label``, ``synsets``, ``relpath``, ``file_path_``.

    :param config: the original's options: ``size`` (256), ``random_crop`` (also as ``{<ClassName>:
        {random_crop: ...}}``), ``keep_orig_class_label``, ``sub_indices`` ("0-9,20"), and this project's
        ``flip_p``, ``min_crop_f``, ``max_crop_f``, ``interpolation``, ``min_image_size``, ``seed``.
    :param process_images: False: items carry paths and labels only.
    :param data_root: see the module docstring.
    """

    NAME = ""
    RANDOM_CROP = False

    def __init__(self, config: Mapping[str, Any] | None = None, process_images: bool = True,
                 data_root: str | None = None) -> None:
        super().__init__()
        self.config = self._check_config(dict(config or {}))
        self.process_images = process_images
        self.data_dir, relpaths = self._index(data_root)
        if "sub_indices" in self.config:
            keep = {index_to_synset()[i] for i in str_to_indices(self.config["sub_indices"])}
            relpaths = [p for p in relpaths if p.split("/")[0] in keep]
        if not relpaths:
            raise FileNotFoundError(f"{type(self).__name__}: no images in {self.data_dir} (after sub_indices)")
        self.relpaths = relpaths
        self.synsets = [p.split("/")[0] for p in relpaths]
        official = synset_to_index()
        if self.config.get("keep_orig_class_label", False):
            unknown = sorted(set(self.synsets) - official.keys())
            if unknown:
                raise ValueError(f"keep_orig_class_label: synset folders {unknown[:5]} are not ImageNet classes")
            self.class_labels = [official[s] for s in self.synsets]
        else:
            order = {s: i for i, s in enumerate(sorted(set(self.synsets)))}
            self.class_labels = [order[s] for s in self.synsets]
        humans = index_to_human()
        self.human_labels = [humans[official[s]] if s in official else s for s in self.synsets]
        size = self.config.get("size", 256)
        self.size = size
        self.transform = SquareCrop(
            size=size, random_crop=self._random_crop(), flip_p=self.config.get("flip_p", 0.0),
            min_crop_f=self.config.get("min_crop_f", 1.0), max_crop_f=self.config.get("max_crop_f", 1.0),
            interpolation=Interpolation.parse(self.config.get("interpolation", "bicubic")))
        self.min_image_size = self.config.get("min_image_size", 8)
        self.seed = self.config.get("seed")

    def _check_config(self, config: dict[str, Any]) -> dict[str, Any]:
        nested = config.pop(type(self).__name__, None)
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown config keys {unknown}; known: {list(_CONFIG_KEYS)}")
        if isinstance(nested, Mapping) and "random_crop" in nested:
            config.setdefault("random_crop", nested["random_crop"])
        return config

    def _random_crop(self) -> bool:
        return bool(self.config.get("random_crop", self.RANDOM_CROP))

    def _candidates(self, data_root: str | None) -> list[Path]:
        base = Path(data_root).expanduser() if data_root else _cache_root()
        return [base / self.NAME / "data", base / self.NAME, base / "data", base]

    def _index(self, data_root: str | None) -> tuple[Path, list[str]]:
        """Finds the image folder and lists ``<synset>/<file>`` paths (sorted)."""
        candidates = self._candidates(data_root)
        for data_dir in candidates:
            filelist = data_dir.parent / "filelist.txt"
            if data_dir.name == "data" and filelist.is_file() and data_dir.is_dir():
                return data_dir, [p for p in read_file_list(filelist) if p.split("/")[-1] not in _IGNORED_FILES]
            if _has_synset_dirs(data_dir):
                relpaths = sorted(f"{d.name}/{f.name}" for d in data_dir.iterdir() if _SYNSET.match(d.name)
                                  for f in d.iterdir() if f.is_file() and f.name not in _IGNORED_FILES)
                return data_dir, relpaths
            flat = self._flat_validation(data_dir)
            if flat:
                return data_dir, flat
        raise FileNotFoundError(
            f"{type(self).__name__}: no ImageNet images found. Looked for synset folders (e.g. n01440764/) in "
            f"{', '.join(str(c) for c in candidates)}. Put the extracted images at "
            f"<data_root>/{self.NAME}/data/<synset>/<file>.JPEG (data_root defaults to {_cache_root()}, or pass "
            f"data_root=...); this project never downloads ImageNet.")

    def _flat_validation(self, data_dir: Path) -> list[str]:
        """``<synset>/<file>`` paths of flat validation images listed in ``validation_synset.txt``."""
        mapping = data_dir.parent / "validation_synset.txt"
        if not (data_dir.is_dir() and mapping.is_file()):
            return []
        pairs = [line.split() for line in read_file_list(mapping)]
        return sorted(f"{synset}/{name}" for name, synset in pairs if (data_dir / name).is_file())

    def file_path(self, index: int) -> Path:
        """The file of item `index` (flat validation files have no synset folder on disk)."""
        synset, name = self.relpaths[index].split("/", 1)
        nested = self.data_dir / synset / name
        return nested if nested.exists() else self.data_dir / name

    def __len__(self) -> int:
        return len(self.relpaths)

    def labels(self, index: int) -> dict[str, Any]:
        return {"relpath": self.relpaths[index], "synsets": self.synsets[index],
                "class_label": self.class_labels[index], "human_label": self.human_labels[index],
                "file_path_": str(self.file_path(index))}

    def load_item(self, index: int) -> dict[str, Any]:
        example = self.labels(index)
        if self.process_images:
            image = open_image(example["file_path_"], min_image_size=self.min_image_size)
            image = self.transform(image, item_rng(self.seed, index))
            example["image"] = to_model_image(image)
        return example


class ImageNetTrain(ImageNetBase):
    NAME = "ILSVRC2012_train"
    RANDOM_CROP = True


class ImageNetValidation(ImageNetBase):
    NAME = "ILSVRC2012_validation"
    RANDOM_CROP = False


class ImageNetSR(RobustImageDataset):
    """High-resolution crops and their degraded low-resolution versions (``image``, ``LR_image``).

    Per item: a square crop of side ``f * min(H, W)``, ``f ~ U(min_crop_f, max_crop_f)`` (random or centre
    position), resized to `size` with area filtering, then degraded by `downscale_f`. The original used a
    pickled list of "HR" images; here images whose short side is below `min_image_size` (default `size`) are
    skipped and counted instead. Both images are float32 HWC in [-1, 1], plus the ImageNet labels.

    :param degradation: a :class:`~ldm.modules.image_degradation.Degradation` name (bsrgan, bsrgan_light,
        bicubic, cv_*, pil_*).
    :param seed: None: training draws fresh crops and degradations, validation uses seed 0 (fixed pairs).
    """

    BASE: type[ImageNetBase] = ImageNetBase
    DEFAULT_SEED: int | None = None

    def __init__(self, size: int = 256, degradation: str = "bsrgan_light", downscale_f: int = 4,
                 min_crop_f: float = 0.5, max_crop_f: float = 1.0, random_crop: bool = True,
                 data_root: str | None = None, min_image_size: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        if not size or size % downscale_f:
            raise ValueError(f"size ({size}) must be a positive multiple of downscale_f ({downscale_f})")
        self.base = self.BASE(config={"size": size}, process_images=False, data_root=data_root)
        self.size, self.downscale_f, self.LR_size = size, downscale_f, size // downscale_f
        self.degradation = Degradation.parse(degradation)
        self.crop = SquareCrop(size=size, random_crop=random_crop, min_crop_f=min_crop_f, max_crop_f=max_crop_f,
                               interpolation=Interpolation.AREA)
        self.min_image_size = size if min_image_size is None else min_image_size
        self.seed = self.DEFAULT_SEED if seed is None else seed

    def __len__(self) -> int:
        return len(self.base)

    def load_item(self, index: int) -> dict[str, Any]:
        example = self.base.labels(index)
        image = open_image(example["file_path_"], min_image_size=self.min_image_size)
        example.update(sr_pair(image, self.crop, self.degradation, self.downscale_f, item_rng(self.seed, index)))
        return example


class ImageNetSRTrain(ImageNetSR):
    BASE = ImageNetTrain


class ImageNetSRValidation(ImageNetSR):
    BASE = ImageNetValidation
    DEFAULT_SEED = 0
