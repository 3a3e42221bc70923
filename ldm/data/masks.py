"""Inpainting masks following LaMa's protocol (Suvorov et al., WACV 2022): random thick, medium and thin brush
strokes and random boxes, with LaMa's parameters for 256 px (``configs/data_gen/random_*_256.yaml``), scaled
linearly with the image side, and masks covering more than ``max_coverage`` (LaMa: 50 %) redrawn.

Masks are float32 [H, W] in {0, 1}, 1 = hole (the convention of the LDM inpainting script).
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np
from PIL import Image, ImageDraw

from ldm.util import parse_enum


@dataclasses.dataclass(frozen=True)
class StrokeParams:
    """LaMa's ``irregular_kwargs``: each of ``U{min_times..max_times}`` strokes has 1-5 segments of length
    ``10 + U{0..max_len-1}``, width ``5 + U{0..max_width-1}`` and turn angles from ``U{0..max_angle-1}`` rad."""

    min_times: int
    max_times: int
    max_width: int
    max_len: int
    max_angle: int = 4


@dataclasses.dataclass(frozen=True)
class BoxParams:
    """LaMa's ``box_kwargs``: ``U{min_times..max_times}`` boxes with sides in ``[bbox_min_size, bbox_max_size)``,
    at least `margin` from the border."""

    min_times: int
    max_times: int
    bbox_min_size: int
    bbox_max_size: int
    margin: int


@dataclasses.dataclass(frozen=True)
class MaskPreset:
    """Strokes with probability ``stroke_p / (stroke_p + box_p)``, else boxes (LaMa's mixed generator)."""

    strokes: StrokeParams | None
    boxes: BoxParams | None
    stroke_p: float = 1.0
    box_p: float = 0.0


class MaskKind(enum.Enum):
    THIN = "thin"
    MEDIUM = "medium"
    THICK = "thick"
    BOX = "box"
    MIXED = "mixed"  # thin, medium or thick with equal probability


PRESETS_256 = {
    MaskKind.THIN: MaskPreset(StrokeParams(min_times=4, max_times=50, max_width=10, max_len=40), None),
    MaskKind.MEDIUM: MaskPreset(StrokeParams(min_times=4, max_times=5, max_width=50, max_len=100),
                                BoxParams(min_times=1, max_times=5, bbox_min_size=10, bbox_max_size=50, margin=0),
                                stroke_p=1.0, box_p=0.3),
    MaskKind.THICK: MaskPreset(StrokeParams(min_times=1, max_times=5, max_width=100, max_len=200),
                               BoxParams(min_times=1, max_times=3, bbox_min_size=30, bbox_max_size=150, margin=10),
                               stroke_p=1.0, box_p=0.3),
    MaskKind.BOX: MaskPreset(None, BoxParams(min_times=1, max_times=3, bbox_min_size=30, bbox_max_size=150,
                                             margin=10), stroke_p=0.0, box_p=1.0),
}


def _scaled(value: float, scale: float) -> int:
    return max(1, int(round(value * scale)))


def draw_strokes(height: int, width: int, params: StrokeParams, rng: np.random.Generator,
                 scale: float = 1.0) -> np.ndarray:
    """Random brush strokes as uint8 [H, W] in {0, 1}; lengths and widths are multiplied by `scale`."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for i in range(int(rng.integers(params.min_times, params.max_times + 1))):
        x, y = float(rng.integers(width)), float(rng.integers(height))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(params.max_angle))
            if i % 2 == 0:
                angle = 2 * np.pi - angle
            length = _scaled(10, scale) + int(rng.integers(_scaled(params.max_len, scale)))
            brush = _scaled(5, scale) + int(rng.integers(_scaled(params.max_width, scale)))
            end_x = float(np.clip(x + length * np.sin(angle), 0, width))
            end_y = float(np.clip(y + length * np.cos(angle), 0, height))
            draw.line([(x, y), (end_x, end_y)], fill=1, width=brush)
            r = brush / 2.0
            for cx, cy in ((x, y), (end_x, end_y)):  # round caps and joints
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
            x, y = end_x, end_y
    return np.asarray(canvas, dtype=np.uint8)


def draw_boxes(height: int, width: int, params: BoxParams, rng: np.random.Generator,
               scale: float = 1.0) -> np.ndarray:
    """Random axis-aligned boxes as uint8 [H, W] in {0, 1}; sizes and margin are multiplied by `scale`."""
    mask = np.zeros((height, width), dtype=np.uint8)
    margin = int(round(params.margin * scale))
    lo = _scaled(params.bbox_min_size, scale)
    hi = min(_scaled(params.bbox_max_size, scale), height - 2 * margin, width - 2 * margin)
    if hi <= lo:
        raise ValueError(f"boxes of at least {lo} px with margin {margin} do not fit in {height}x{width}")
    for _ in range(int(rng.integers(params.min_times, params.max_times + 1))):
        bw, bh = int(rng.integers(lo, hi)), int(rng.integers(lo, hi))
        left = int(rng.integers(margin, width - margin - bw + 1))
        top = int(rng.integers(margin, height - margin - bh + 1))
        mask[top:top + bh, left:left + bw] = 1
    return mask


class MaskGenerator:
    """Draws LaMa-style masks of one :class:`MaskKind`.

    :param kind: thin, medium, thick, box or mixed.
    :param max_coverage: masks covering more (or nothing) are redrawn (LaMa's ``max_tamper_area``).
    :param reference_side: the side the presets are given for (LaMa: 256).
    """

    max_draws = 100

    def __init__(self, kind: str | MaskKind = MaskKind.MIXED, max_coverage: float = 0.5,
                 reference_side: int = 256) -> None:
        self.kind = parse_enum(MaskKind, kind, "mask kind")
        if not 0.0 < max_coverage <= 1.0:
            raise ValueError(f"max_coverage must be in (0, 1], got {max_coverage}")
        self.max_coverage = max_coverage
        self.reference_side = reference_side

    def _draw_once(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        kind = self.kind
        if kind is MaskKind.MIXED:
            kind = (MaskKind.THIN, MaskKind.MEDIUM, MaskKind.THICK)[int(rng.integers(3))]
        preset = PRESETS_256[kind]
        scale = min(height, width) / self.reference_side
        if preset.boxes is None or (preset.strokes is not None
                                    and rng.random() < preset.stroke_p / (preset.stroke_p + preset.box_p)):
            return draw_strokes(height, width, preset.strokes, rng, scale)
        return draw_boxes(height, width, preset.boxes, rng, scale)

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """A mask float32 [height, width] in {0, 1} (1 = hole) with coverage in (0, max_coverage]."""
        for _ in range(self.max_draws):
            mask = self._draw_once(height, width, rng)
            if 0.0 < mask.mean() <= self.max_coverage:
                return mask.astype(np.float32)
        raise RuntimeError(f"no {self.kind.value} mask of {height}x{width} with coverage <= {self.max_coverage} "
                           f"in {self.max_draws} draws; raise max_coverage")
