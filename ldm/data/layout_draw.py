"""Drawing bounding-box layouts (boxes in a colour per class, with class names) onto images, for image logs and
layout-to-image scripts."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.data.layout import Layout

# matplotlib's "tab10" colours: distinct on photos and on white
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The drawing colour of a class (RGB, 0-255)."""
    return PALETTE[int(class_id) % len(PALETTE)]


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def _label(layout: Layout, i: int, class_names: Sequence[str] | None) -> str:
    class_id = int(layout.class_ids[i])
    name = class_names[class_id] if class_names is not None and class_id < len(class_names) else str(class_id)
    return f"{name} (group)" if bool(layout.group[i]) else name


def draw_layout(layout: Layout, image: torch.Tensor | None = None, size: tuple[int, int] = (256, 256),
                class_names: Sequence[str] | None = None, line_width: int | None = None,
                labels: bool = True) -> torch.Tensor:
    """Draws the boxes of `layout` (in the frame of its crop, i.e. on the picture) with their class names.

    :param layout: the objects; boxes in [0, 1].
    :param image: a [3 x H x W] Tensor in [-1, 1] to draw on; None: a white canvas of `size`.
    :param size: (height, width) of the canvas when `image` is None.
    :param class_names: names by class id (else the ids are written).
    :param line_width: box outline width in pixels (default: about 1% of the side, at least 1).
    :param labels: write the class names.
    :return: a [3 x H x W] float Tensor in [-1, 1].
    """
    canvas = Image.new("RGB", (size[1], size[0]), (255, 255, 255)) if image is None else _to_pil(image)
    width, height = canvas.size
    lw = line_width or max(1, round(min(width, height) / 100))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(8, min(width, height) // 20))
    boxes = layout.in_crop_frame().boxes
    for i in range(len(layout)):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        # a box covers the pixels [x0 W, x1 W) x [y0 H, y1 H); PIL's rectangle includes both corners
        rect = [x0 * width, y0 * height, max(x0 * width, x1 * width - 1), max(y0 * height, y1 * height - 1)]
        colour = class_colour(int(layout.class_ids[i]))
        draw.rectangle(rect, outline=colour, width=lw)
        if labels:
            text = _label(layout, i, class_names)
            _, _, text_w, text_h = draw.textbbox((0, 0), text, font=font)
            # above the box where there is room, else inside its top edge
            origin = (rect[0], rect[1] - text_h - 1) if rect[1] >= text_h + 1 else (rect[0] + lw, rect[1] + lw)
            draw.rectangle([origin[0], origin[1], origin[0] + text_w, origin[1] + text_h], fill=colour)
            draw.text(origin, text, fill=(255, 255, 255), font=font)
    out = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float()
    return out / 127.5 - 1.0


def draw_layouts(layouts: Sequence[Layout], images: torch.Tensor | None = None, size: tuple[int, int] = (256, 256),
                 class_names: Sequence[str] | None = None, **kwargs: object) -> torch.Tensor:
    """:func:`draw_layout` for a batch: N layouts (on [N x 3 x H x W] `images`) -> an [N x 3 x H x W] Tensor."""
    if images is not None and len(images) != len(layouts):
        raise ValueError(f"draw_layouts: {len(layouts)} layouts for {len(images)} images")
    drawn = [draw_layout(layout, None if images is None else images[i], size, class_names, **kwargs)
             for i, layout in enumerate(layouts)]
    return torch.stack(drawn)
