"""Reading COCO-style instance JSON into per-image object lists (plain ``json``; ``pycocotools`` is not needed).

The file holds ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``,
``bbox`` = [x, y, w, h], ``category_id``, optional ``iscrowd`` and ``id``) and ``categories`` (``id``, ``name``),
as COCO's ``instances_*.json``. Two relaxations make hand-written layouts easy: an annotation may name its class
with ``category`` (a name) instead of ``category_id``, and ``categories`` may be left out when the class names are
given. Boxes are in pixels (COCO), or fractions of the image in [0, 1] with ``normalized=True`` (e.g. OpenImages
boxes converted to this format); then ``width``/``height`` are not needed.

Errors name the file and the entry (``annotations[12] (id 345)``): a malformed entry, a box outside [0, 1]
(normalised input), an unknown class name or category id, an annotation of an unknown image.
:func:`encode_layout_file` turns such a file into the token sequences a layout model is conditioned on.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ldm.data.layout import LayoutTokenizer
from ldm.util import parse_enum

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-6


class LayoutFileError(ValueError):
    """A layout/annotation file that cannot be used; the message names the file and the entry."""


class CrowdBoxes(enum.Enum):
    """What to do with crowd boxes (COCO ``iscrowd: 1``): leave them out, keep them flagged as groups (the
    original's ``use_group_parameter``: class token ``class_id + num_classes``), or keep them as plain boxes."""

    SKIP = "skip"
    GROUP = "group"
    KEEP = "keep"

    @classmethod
    def parse(cls, value: str | CrowdBoxes) -> CrowdBoxes:
        return parse_enum(cls, value, "crowd")


@dataclasses.dataclass(frozen=True)
class LayoutBox:
    """One object: ``box`` (x0, y0, x1, y1) in pixels of the image (or in [0, 1] for normalised input)."""

    class_id: int
    box: tuple[float, float, float, float]
    group: bool
    entry: str


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """One image of the file: its ``file_name`` (None when the file gives none), size (0 when unknown) and boxes."""

    image_id: str
    file_name: str | None
    width: int
    height: int
    objects: tuple[LayoutBox, ...]


@dataclasses.dataclass(frozen=True)
class LayoutFile:
    """A parsed file: the class names (class id = index) and the images, in file order."""

    path: Path
    class_names: tuple[str, ...]
    images: tuple[ImageLayout, ...]
    skipped_crowd: int = 0
    skipped_classes: int = 0


def read_class_names(spec: str | Path | Sequence[str] | None) -> list[str] | None:
    """Class names from a list, or a text file with one name per line; None stays None."""
    if spec is None:
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class_names: file {path} does not exist (give a list of names or a text file "
                                    f"with one name per line)")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [str(n) for n in spec]


def _entry(section: str, index: int, item: Mapping[str, Any]) -> str:
    ident = item.get("id") if isinstance(item, Mapping) else None
    return f"{section}[{index}]" + (f" (id {ident})" if ident is not None else "")


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(f"layout annotation file {path}{where} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutFileError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LayoutFileError(f"{path}: the top level must be an object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise LayoutFileError(f"{path}: missing list '{key}' (COCO-style instance JSON has 'images', "
                                  f"'annotations' and 'categories')")
    return data


def _categories(data: Mapping[str, Any], path: Path) -> dict[Any, str]:
    """Category id -> name from ``categories`` (empty when the file has none)."""
    categories = data.get("categories", [])
    if not isinstance(categories, list):
        raise LayoutFileError(f"{path}: 'categories' must be a list")
    out: dict[Any, str] = {}
    for i, cat in enumerate(categories):
        if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
            raise LayoutFileError(f"{path}: {_entry('categories', i, cat)} needs 'id' and 'name'")
        if cat["id"] in out:
            raise LayoutFileError(f"{path}: {_entry('categories', i, cat)} repeats category id {cat['id']}")
        out[cat["id"]] = str(cat["name"])
    return out


def _images(data: Mapping[str, Any], path: Path, normalized: bool) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, Mapping) or "id" not in img:
            raise LayoutFileError(f"{path}: {_entry('images', i, img)} needs an 'id'")
        width, height = img.get("width", 0), img.get("height", 0)
        if not normalized and not (isinstance(width, (int, float)) and isinstance(height, (int, float))
                                   and width > 0 and height > 0):
            raise LayoutFileError(f"{path}: {_entry('images', i, img)} needs a positive 'width' and 'height' "
                                  f"for boxes in pixels (or read the file with normalized boxes)")
        if img["id"] in out:
            raise LayoutFileError(f"{path}: {_entry('images', i, img)} repeats image id {img['id']}")
        out[img["id"]] = {"file_name": img.get("file_name"), "width": int(width or 0), "height": int(height or 0),
                          "objects": []}
    return out


def _box(ann: Mapping[str, Any], entry: str, path: Path, image: Mapping[str, Any],
         normalized: bool) -> tuple[float, float, float, float]:
    """Corners (x0, y0, x1, y1) of an annotation's [x, y, w, h]; pixel boxes are clipped to the image (COCO boxes
    overshoot it by rounding), normalised ones must lie in [0, 1]."""
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise LayoutFileError(f"{path}: {entry}: 'bbox' must be four numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise LayoutFileError(f"{path}: {entry}: bbox {list(bbox)} has a negative width or height")
    x0, y0, x1, y1 = x, y, x + w, y + h
    if normalized:
        if min(x0, y0) < -_TOLERANCE or max(x1, y1) > 1.0 + _TOLERANCE:
            raise LayoutFileError(f"{path}: {entry}: bbox {list(bbox)} (x, y, w, h) is outside [0, 1]; boxes of "
                                  f"this file are read as fractions of the image")
        return (max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0))
    W, H = image["width"], image["height"]
    return (min(max(x0, 0.0), W), min(max(y0, 0.0), H), min(max(x1, 0.0), W), min(max(y1, 0.0), H))


def read_layout_file(path: str | Path, class_names: Sequence[str] | None = None, normalized: bool = False,
                     crowd: str | CrowdBoxes = CrowdBoxes.SKIP) -> LayoutFile:
    """Reads a COCO-style instance JSON file (see the module docstring).

    :param class_names: the classes and their order (class id = index). Annotations of categories not in the
        list are left out (counted in ``skipped_classes``); a name that is not among the file's categories is an
        error. Default: the file's categories in file order.
    :param normalized: boxes are fractions of the image in [0, 1] (else pixels).
    :param crowd: what to do with ``iscrowd`` boxes (:class:`CrowdBoxes`).
    :raises LayoutFileError: naming the file and the entry.
    """
    path = Path(path).expanduser()
    crowd = CrowdBoxes.parse(crowd)
    data = _load(path)
    categories = _categories(data, path)
    file_names = list(dict.fromkeys(categories.values()))
    if class_names is None:
        if not categories:
            raise LayoutFileError(f"{path}: no 'categories' in the file; give the class names")
        names = file_names
    else:
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            raise LayoutFileError(f"{path}: class_names lists a name twice: {names}")
        unknown = [n for n in names if categories and n not in file_names]
        if unknown:
            raise LayoutFileError(f"{path}: unknown class name(s) {unknown}: the file's categories are "
                                  f"{file_names}")
    class_of_name = {n: i for i, n in enumerate(names)}
    images = _images(data, path, normalized)
    skipped_crowd = skipped_classes = 0
    for i, ann in enumerate(data["annotations"]):
        entry = _entry("annotations", i, ann)
        if not isinstance(ann, Mapping):
            raise LayoutFileError(f"{path}: {entry} is not an object")
        if ann.get("image_id") not in images:
            raise LayoutFileError(f"{path}: {entry} refers to image_id {ann.get('image_id')!r}, which is not in "
                                  f"'images'")
        if "category" in ann:
            name = str(ann["category"])
            if name not in class_of_name and name not in file_names:
                raise LayoutFileError(f"{path}: {entry} has the unknown class name {name!r}; known: {names}")
        elif "category_id" in ann:
            if ann["category_id"] not in categories:
                raise LayoutFileError(f"{path}: {entry} has category_id {ann['category_id']!r}, which is not in "
                                      f"'categories'")
            name = categories[ann["category_id"]]
        else:
            raise LayoutFileError(f"{path}: {entry} needs 'category_id' (or a class name as 'category')")
        image = images[ann["image_id"]]
        box = _box(ann, entry, path, image, normalized)
        if name not in class_of_name:
            skipped_classes += 1
            continue
        is_crowd = bool(ann.get("iscrowd", 0))
        if is_crowd and crowd is CrowdBoxes.SKIP:
            skipped_crowd += 1
            continue
        image["objects"].append(LayoutBox(class_of_name[name], box, is_crowd and crowd is CrowdBoxes.GROUP, entry))
    if skipped_crowd or skipped_classes:
        logger.info("%s: left out %d crowd boxes and %d boxes of classes not in class_names", path, skipped_crowd,
                    skipped_classes)
    layouts = tuple(ImageLayout(str(k), v["file_name"], v["width"], v["height"], tuple(v["objects"]))
                    for k, v in images.items())
    return LayoutFile(path, tuple(names), layouts, skipped_crowd, skipped_classes)


def encode_layout_file(path: str | Path, tokenizer: LayoutTokenizer, class_names: Sequence[str],
                       normalized: bool = True, crowd: str | CrowdBoxes = CrowdBoxes.GROUP) -> tuple[torch.Tensor,
                                                                                               list[str]]:
    """The token sequences of every image of a layout file, e.g. the input of a layout-to-image script.

    :param tokenizer: the model's tokenizer (its ``num_classes`` must be ``len(class_names)``).
    :param class_names: the model's classes; a name in the file that is not among them is an error.
    :param normalized: the file's boxes are fractions of the image (else pixels of each image's width/height).
    :return: an [N x seq_len] long Tensor (whole-image crop) and the N image ids, in file order.
    :raises LayoutFileError: naming the file and the entry (as :func:`read_layout_file`), or the image with more
        objects than the tokenizer holds.
    """
    if tokenizer.num_classes != len(class_names):
        raise ValueError(f"encode_layout_file: the tokenizer has {tokenizer.num_classes} classes, class_names "
                         f"{len(class_names)}")
    parsed = read_layout_file(path, class_names, normalized, crowd)
    if parsed.skipped_classes:
        raise LayoutFileError(f"{parsed.path}: {parsed.skipped_classes} boxes are of categories not among the "
                              f"model's classes {list(class_names)}")
    tokens = []
    for index, image in enumerate(parsed.images):
        if len(image.objects) > tokenizer.max_objects:
            raise LayoutFileError(f"{parsed.path}: images[{index}] (id {image.image_id}) has {len(image.objects)} "
                                  f"boxes; the model takes at most {tokenizer.max_objects}")
        scale = [1.0] * 4 if normalized else [image.width, image.height] * 2
        boxes = torch.tensor([o.box for o in image.objects], dtype=torch.float64).reshape(-1, 4)
        boxes = boxes / torch.tensor(scale, dtype=torch.float64)
        tokens.append(tokenizer.encode(boxes, [o.class_id for o in image.objects], [o.group for o in image.objects]))
    return torch.stack(tokens), [image.image_id for image in parsed.images]
