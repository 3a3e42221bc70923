"""A folder of your own images, with optional captions and optional class sub-folders.

Captions (``captions=``):

- ``"txt"``: a ``.txt`` file beside each image with the same stem (``cat.jpg`` -> ``cat.txt``);
- ``"csv:<file>"``: a CSV with a header naming a file column (``file_name``, ``file``, ``filename``, ``image``,
  ``path``) and a caption column (``caption``, ``text``, ``prompt``);
- ``"jsonl:<file>"``: one JSON object per line with the same keys.

With a CSV/JSONL only the listed images are used (paths relative to `root`); ``<file>`` itself is looked up as
given, then inside `root`. With ``class_subfolders=True`` the first-level folder names are the classes
(``class_label`` in sorted order, ``human_label`` the folder name).
"""
from __future__ import annotations

import csv
import enum
import json
import logging
from pathlib import Path
from typing import Any

from ldm.data.base import (Interpolation, RobustImageDataset, SquareCrop, item_rng, list_images, open_image,
                           require_dir, to_model_image)
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

FILE_KEYS = ("file_name", "file", "filename", "image", "path", "image_path")
CAPTION_KEYS = ("caption", "text", "prompt")


class CaptionSource(enum.Enum):
    TXT = "txt"
    CSV = "csv"
    JSONL = "jsonl"


def _pick(record: dict[str, Any], keys: tuple[str, ...], what: str, where: str) -> str:
    for key in keys:
        if key in record:
            return str(record[key])
    raise ConfigError(f"{where}: no {what} column; expected one of {list(keys)}, found {sorted(record)}")


def _read_table(source: CaptionSource, path: Path) -> list[tuple[str, str]]:
    """(relative path, caption) pairs of a CSV or JSONL file."""
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if source is CaptionSource.CSV:
            records = list(csv.DictReader(f))
        else:
            records = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not a JSON object ({e})") from None
    for n, record in enumerate(records, 1):
        where = f"{path} (record {n})"
        rows.append((_pick(record, FILE_KEYS, "file", where), _pick(record, CAPTION_KEYS, "caption", where)))
    return rows


class ImageFolderDataset(RobustImageDataset):
    """Items: ``image`` float32 [size, size, 3] in [-1, 1], ``relpath``, ``file_path_``, plus ``caption`` (with
    captions) and ``class_label``/``human_label`` (with class sub-folders).

    :param root: the image folder.
    :param size: output side; None keeps the short side of the square crop.
    :param captions: None, "txt", "csv:<file>" or "jsonl:<file>" (see the module docstring).
    :param class_subfolders: take classes from the first-level folder names.
    :param random_crop: random instead of centre crop position.
    :param flip_p: horizontal flip probability.
    :param min_crop_f: smallest crop side as a fraction of the short side.
    :param max_crop_f: largest crop side as a fraction of the short side.
    :param interpolation: resampling filter name.
    :param min_image_size: smaller images are skipped and counted.
    :param seed: None: fresh random crops/flips; an int: fixed per index.
    """

    def __init__(self, root: str, size: int | None = 256, captions: str | None = None,
                 class_subfolders: bool = False, random_crop: bool = False, flip_p: float = 0.0,
                 min_crop_f: float = 1.0, max_crop_f: float = 1.0, interpolation: str = "bicubic",
                 min_image_size: int = 8, seed: int | None = None) -> None:
        super().__init__()
        self.root = require_dir(root, "ImageFolderDataset: root should be a folder of images")
        self.missing_captions = 0
        self.source, relpaths, self.captions = self._index(captions)
        if class_subfolders:
            nested = [r for r in relpaths if "/" in r]
            if len(nested) < len(relpaths):
                logger.warning("ImageFolderDataset: ignoring %d images directly in %s (class_subfolders=True)",
                               len(relpaths) - len(nested), self.root)
            keep = set(nested)
            self.captions = [c for r, c in zip(relpaths, self.captions) if r in keep] if self.captions else []
            relpaths = nested
            self.classes = sorted({r.split("/", 1)[0] for r in relpaths})
        else:
            self.classes = []
        if not relpaths:
            raise FileNotFoundError(f"ImageFolderDataset: no images found in {self.root}"
                                    + (" (inside class sub-folders)" if class_subfolders else ""))
        self.relpaths = relpaths
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.transform = SquareCrop(size=size, random_crop=random_crop, min_crop_f=min_crop_f,
                                    max_crop_f=max_crop_f, flip_p=flip_p,
                                    interpolation=Interpolation.parse(interpolation))
        self.min_image_size = min_image_size
        self.seed = seed

    def _index(self, captions: str | None) -> tuple[CaptionSource | None, list[str], list[str]]:
        if captions is None:
            return None, [p.relative_to(self.root).as_posix() for p in list_images(self.root)], []
        kind, _, file = str(captions).partition(":")
        try:
            source = CaptionSource(kind)
        except ValueError:
            raise ConfigError(f"ImageFolderDataset: captions={captions!r}; use None, 'txt', 'csv:<file>' or "
                              f"'jsonl:<file>'") from None
        if source is CaptionSource.TXT:
            relpaths = [p.relative_to(self.root).as_posix() for p in list_images(self.root)]
            return source, relpaths, [self._txt_caption(r) for r in relpaths]
        if not file:
            raise ConfigError(f"ImageFolderDataset: captions={captions!r} needs a file name after the colon")
        table = Path(file).expanduser()
        if not table.is_file() and (self.root / file).is_file():
            table = self.root / file
        if not table.is_file():
            raise FileNotFoundError(f"ImageFolderDataset: caption file {file} not found (looked at {table} "
                                    f"and {self.root / file})")
        rows = _read_table(source, table)
        present = [(r, c) for r, c in rows if (self.root / r).is_file()]
        if len(present) < len(rows):
            missing = [r for r, _ in rows if not (self.root / r).is_file()]
            logger.warning("ImageFolderDataset: %d files listed in %s are missing under %s, e.g. %s",
                           len(missing), table, self.root, missing[:3])
        return source, [r for r, _ in present], [c for _, c in present]

    def _txt_caption(self, relpath: str) -> str:
        txt = (self.root / relpath).with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip()
        self.missing_captions += 1
        if self.missing_captions == 1:
            logger.warning("ImageFolderDataset: no caption file %s; using empty captions where missing", txt)
        return ""

    def __len__(self) -> int:
        return len(self.relpaths)

    def load_item(self, index: int) -> dict[str, Any]:
        relpath = self.relpaths[index]
        path = self.root / relpath
        image = self.transform(open_image(path, min_image_size=self.min_image_size), item_rng(self.seed, index))
        example: dict[str, Any] = {"image": to_model_image(image), "relpath": relpath, "file_path_": str(path)}
        if self.source is not None:
            example["caption"] = self.captions[index]
        if self.classes:
            name = relpath.split("/", 1)[0]
            example["class_label"] = self.class_index[name]
            example["human_label"] = name
        return example
