"""Patch-wise processing of large images and latents by overlapping tiles blended with border weights: the
``split_input_params`` mechanism of the original LatentDiffusion (its ``get_fold_unfold``, ``delta_border`` and
``get_weighting``), as pure functions that wrap any encode/decode/denoise callable.

A function ``fn`` (e.g. a first-stage decoder) is applied to square-ish tiles of side ``ks`` taken every
``stride`` pixels of the input; each output tile is ``scale`` times the input tile (decode: the first stage's
factor f, encode: 1/f, a denoiser: 1). Output tiles are blended by weights that fall off towards the tile
border: ``out = sum_i w_i * fn(tile_i) / sum_i w_i``. The weight of a pixel is its normalised distance to the
tile border (0 at the border, 0.5 at the centre) clipped to ``[clip_min_weight, clip_max_weight]``; with
``tie_breaker`` it is multiplied by the same function of the tile's position in the grid of tiles (clipped to
the ``*_tie_weight`` bounds), which favours inner tiles. Where tiles do not overlap, the output is exactly the
tile's own output.

Differences from the original, all where it failed: tiles that would leave the last rows/columns uncovered
(``(size - ks) % stride != 0``; the original divided by zero there) get one more tile flush with the border; a
dimension of length one (one tile in a row with the tie breaker, or a 1-pixel tile) is treated as its own centre
instead of dividing zero by zero; output tiles are accumulated one at a time instead of stacked, so memory is
one tile's working set plus the output.
"""
from __future__ import annotations

import dataclasses
import logging
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor, "Window"], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TileWeighting:
    """The overlap weights (the original's ``clip_*_weight`` keys and ``tie_braker``)."""

    clip_min_weight: float = 0.01
    clip_max_weight: float = 0.5
    tie_breaker: bool = False
    clip_min_tie_weight: float = 0.01
    clip_max_tie_weight: float = 0.5

    def __post_init__(self) -> None:
        for low, high, names in ((self.clip_min_weight, self.clip_max_weight, "clip_min_weight/clip_max_weight"),
                                 (self.clip_min_tie_weight, self.clip_max_tie_weight,
                                  "clip_min_tie_weight/clip_max_tie_weight")):
            if not 0.0 < low <= high:
                raise ValueError(f"{names} must satisfy 0 < min <= max (a zero weight leaves border pixels "
                                 f"undefined), got {low}, {high}")


@dataclasses.dataclass(frozen=True)
class Window:
    """One tile: ``top``/``left``/``height``/``width`` in input pixels and its ``row``/``col`` in the grid of
    ``rows`` x ``cols`` tiles."""

    top: int
    left: int
    height: int
    width: int
    row: int
    col: int
    rows: int
    cols: int

    def slices(self, scale: Fraction | int = 1) -> tuple[slice, slice]:
        """Row and column slices of this tile in a tensor `scale` times the input size."""
        s = Fraction(scale)
        top, left = int(self.top * s), int(self.left * s)
        return slice(top, top + int(self.height * s)), slice(left, left + int(self.width * s))

    def normalized(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The tile as (x0, y0, x1, y1) in [0, 1] of an input of `height` x `width` (e.g. the crop of a layout
        token sequence that describes this tile)."""
        return (self.left / width, self.top / height, (self.left + self.width) / width,
                (self.top + self.height) / height)


def _positions(size: int, ks: int, stride: int) -> list[int]:
    starts = list(range(0, size - ks + 1, stride))
    if starts[-1] + ks < size:
        starts.append(size - ks)
    return starts


def tile_windows(height: int, width: int, ks: int | Sequence[int], stride: int | Sequence[int]) -> list[Window]:
    """The tiles covering an input of `height` x `width`, row by row.

    Tiles of ``ks`` = (kh, kw) start every ``stride`` = (sh, sw) pixels (one more flush with the far border when
    the last would leave pixels uncovered); a kernel larger than the input shrinks to it, as in the original.
    """
    kh, kw = _pair(ks, "ks")
    sh, sw = _pair(stride, "stride")
    if sh > kh or sw > kw:
        raise ValueError(f"stride {(sh, sw)} is larger than ks {(kh, kw)}: the tiles would leave gaps")
    kh, kw = min(kh, height), min(kw, width)
    tops, lefts = _positions(height, kh, min(sh, kh)), _positions(width, kw, min(sw, kw))
    return [Window(t, l, kh, kw, r, c, len(tops), len(lefts))
            for r, t in enumerate(tops) for c, l in enumerate(lefts)]


def _axis_fraction(n: int, device: torch.device | None) -> torch.Tensor:
    """Positions 0..n-1 as fractions of the axis (0 .. 1); a single position is the centre, 0.5."""
    if n == 1:
        return torch.full((1,), 0.5, device=device)
    return torch.arange(n, device=device, dtype=torch.float64) / (n - 1)


def border_distance(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """The normalised distance of each pixel to the nearest border: an [height x width] Tensor, 0 at the border
    and 0.5 at the centre (the original's ``delta_border``)."""
    y = _axis_fraction(height, device).double()
    x = _axis_fraction(width, device).double()
    dy = torch.minimum(y, 1.0 - y)[:, None]
    dx = torch.minimum(x, 1.0 - x)[None, :]
    return torch.minimum(dy, dx)


def tile_weight(window: Window, height: int, width: int, weighting: TileWeighting,
                device: torch.device | None = None) -> torch.Tensor:
    """The blending weights of one output tile of `height` x `width`: an [height x width] float64 Tensor."""
    w = border_distance(height, width, device).clamp(weighting.clip_min_weight, weighting.clip_max_weight)
    if weighting.tie_breaker:
        grid = border_distance(window.rows, window.cols, device)[window.row, window.col]
        w = w * grid.clamp(weighting.clip_min_tie_weight, weighting.clip_max_tie_weight)
    return w


def blend_tiles(fn: TileFn, x: torch.Tensor, ks: int | Sequence[int], stride: int | Sequence[int],
                scale: Fraction | int | float = 1, weighting: TileWeighting | None = None,
                progress: bool = False) -> torch.Tensor:
    """Applies `fn` to overlapping tiles of `x` and blends the outputs (see the module docstring).

    :param fn: ``fn(tile, window)`` maps an [N x C x kh x kw] tile to an [N x C' x kh*scale x kw*scale] Tensor;
        `window` says where the tile lies (to cut matching conditioning, for instance).
    :param x: an [N x C x H x W] Tensor.
    :param ks: tile size in pixels of `x`, an int or (height, width).
    :param stride: tile step in pixels of `x`, an int or (height, width), at most `ks`.
    :param scale: output pixels per input pixel (a first stage's factor f to decode, 1/f to encode).
    :param weighting: the overlap weights; default :class:`TileWeighting` ().
    :param progress: show a progress bar over the tiles.
    :return: an [N x C' x H*scale x W*scale] Tensor in the dtype of `fn`'s output. A pixel that one tile alone
        covers is exactly that tile's output.
    """
    weighting = weighting or TileWeighting()
    s = Fraction(scale).limit_denominator(1 << 16)
    n, _, height, width = x.shape
    windows = tile_windows(height, width, ks, stride)
    sizes = [height * s, width * s] + [v * s for w in windows for v in (w.top, w.left, w.height, w.width)]
    if any(v.denominator != 1 for v in sizes):
        raise ValueError(f"scale {s}: the input {height}x{width}, ks {ks} and stride {stride} must be divisible "
                         f"by {s.denominator}")
    out_h, out_w = int(height * s), int(width * s)
    weights = [tile_weight(w, int(w.height * s), int(w.width * s), weighting, x.device) for w in windows]
    total = torch.zeros(out_h, out_w, dtype=torch.float64, device=x.device)
    for window, weight in zip(windows, weights):
        total[window.slices(s)] += weight
    out = None
    for window, weight in tqdm(list(zip(windows, weights)), desc="tiles", disable=not progress, leave=False):
        rows, cols = window.slices()
        y = fn(x[:, :, rows, cols], window)
        out_rows, out_cols = window.slices(s)
        if (y.shape[0], *y.shape[2:]) != (n, *weight.shape):
            raise ValueError(f"blend_tiles: fn returned {tuple(y.shape)} for a tile of {window.height}x"
                             f"{window.width} at scale {s}; expected [N={n} x C x {weight.shape[0]} x "
                             f"{weight.shape[1]}]")
        if out is None:
            out = y.new_zeros(n, y.shape[1], out_h, out_w)
        share = (weight / total[out_rows, out_cols]).to(y.device, y.dtype)  # exactly 1 where one tile covers
        out[:, :, out_rows, out_cols] += y * share
    return out


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, ks: int | Sequence[int],
                 stride: int | Sequence[int], factor: int, weighting: TileWeighting | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Decodes [N x C x h x w] latents by tiles of `ks` latent pixels every `stride`: [N x 3 x h*f x w*f].

    :param decode: the first stage's decode, latents [N x C x kh x kw] -> images [N x 3 x kh*f x kw*f].
    :param factor: the first stage's downsampling factor f (the original's ``vqf``).
    """
    return blend_tiles(lambda tile, _: decode(tile), z, ks, stride, factor, weighting, progress)


def encode_tiled(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ks: int | Sequence[int],
                 stride: int | Sequence[int], factor: int, weighting: TileWeighting | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Encodes [N x 3 x H x W] images by tiles of `ks` pixels every `stride`: [N x C x H/f x W/f].

    :param encode: images -> latent *tensors* (for a KL first stage, blend the distribution's parameters, e.g.
        ``lambda x: model.encode(x).parameters``, and build the distribution from the result).
    :param factor: the first stage's downsampling factor f (`ks`, `stride` and the image size divisible by it).
    """
    return blend_tiles(lambda tile, _: encode(tile), x, ks, stride, Fraction(1, factor), weighting, progress)


@dataclasses.dataclass(frozen=True)
class SplitInputParams:
    """The original's ``split_input_params`` dict, checked.

    ``ks`` and ``stride`` are the tile size and step: in latent pixels to decode and to run the denoiser, and in
    image pixels to encode (the original used the same numbers for both); ``vqf`` is the first stage's factor f;
    ``patch_distributed_vq`` tiles the first stage (else only the denoiser); ``weighting`` the overlap weights.
    """

    ks: tuple[int, int]
    stride: tuple[int, int]
    vqf: int
    patch_distributed_vq: bool = True
    weighting: TileWeighting = TileWeighting()

    KEYS = ("ks", "stride", "vqf", "patch_distributed_vq", "tie_braker", "clip_max_weight", "clip_min_weight",
            "clip_max_tie_weight", "clip_min_tie_weight", "original_image_size")

    @classmethod
    def from_config(cls, params: Mapping[str, Any], where: str = "split_input_params") -> SplitInputParams:
        """Parses the dict; an unknown or malformed key raises a ValueError naming ``<where>.<key>``.

        ``original_image_size`` (which the original wrote into the dict while encoding) is accepted and ignored.
        """
        unknown = sorted(set(params) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {', '.join(cls.KEYS)}")
        for key in ("ks", "stride", "vqf"):
            if key not in params:
                raise ValueError(f"{where}.{key} is required (e.g. ks: [128, 128], stride: [64, 64], vqf: 4)")
        vqf = params["vqf"]
        if not isinstance(vqf, int) or vqf < 1:
            raise ValueError(f"{where}.vqf must be a positive int (the first stage's factor), got {vqf!r}")
        weights = {k: float(params[k]) for k in ("clip_max_weight", "clip_min_weight", "clip_max_tie_weight",
                                                 "clip_min_tie_weight") if k in params}
        try:
            weighting = TileWeighting(tie_breaker=bool(params.get("tie_braker", False)), **weights)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ks, stride = _pair(params["ks"], f"{where}.ks"), _pair(params["stride"], f"{where}.stride")
        if stride[0] > ks[0] or stride[1] > ks[1]:
            raise ValueError(f"{where}.stride {list(stride)} is larger than ks {list(ks)}: the tiles would leave gaps")
        return cls(ks, stride, vqf, bool(params.get("patch_distributed_vq", True)), weighting)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or two of them, got {value!r}")
    return pair  # type: ignore[return-value]
