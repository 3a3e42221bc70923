"""Bounding-box layouts and their token sequences, the conditioning of layout-to-image LDMs (Rombach et al. 2022,
Sec. 4.3.1: "we discretise the spatial locations of the bounding boxes and encode each box as a (l, b, c)-tuple,
where l denotes the (discrete) top-left and b the bottom-right position, and c the class").

Token format: the "objects_bbox" conditional builder of CompVis taming-transformers
(``taming/data/conditional_builder/objects_bbox.py`` and ``objects_center_points.py``), which produced the
``coordinates_bbox`` batches of the released ``layout2img-openimages256`` model (its ``BERTEmbedder`` has
``vocab_size: 8192, max_seq_len: 92`` = 30 objects x 3 tokens + 2 crop tokens). With ``V = vocab_size``:

- ``S = floor(sqrt(V))`` positions per axis; a point (x, y) in [0, 1]^2 is the token
  ``round(y * (S - 1)) * S + round(x * (S - 1))`` (round half to even, as Python's ``round``), so a coordinate is
  recovered within half a step ``1 / (2 (S - 1))`` (S = 90 for V = 8192: within 0.0056);
- an object is ``(c, token(x0, y0), token(x1, y1))`` with the class token ``c = class_id + num_classes * group``
  (``group``: a COCO crowd / OpenImages "group of" box, when ``use_group_flag``; else ``c = class_id``);
- objects follow each other in the given order, then ``(pad, pad, pad)`` up to ``max_objects``, where
  ``pad = V - 1``;
- with ``encode_crop`` two more tokens ``token(crop x0, y0), token(crop x1, y1)`` say which part of the image the
  picture shows; the boxes are then in the coordinates of the whole (uncropped) image. Without it, the boxes are
  in the coordinates of the picture and nothing is appended.

Boxes here are corners ``(x0, y0, x1, y1)`` in [0, 1], x to the right, y down (the original passed
``(x0, y0, w, h)``; the tokens are the same).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

FULL_CROP = (0.0, 0.0, 1.0, 1.0)
_TOLERANCE = 1e-6  # boxes computed in float32 may overshoot [0, 1] by rounding


@dataclasses.dataclass(frozen=True)
class Layout:
    """Objects of one picture: boxes, classes, group flags, and the crop the picture shows.

    :param boxes: a [K x 4] float Tensor of corners (x0, y0, x1, y1) in [0, 1].
    :param class_ids: a [K] long Tensor.
    :param group: a [K] bool Tensor (crowd / "group of" boxes).
    :param crop: (x0, y0, x1, y1) of the picture in the frame of `boxes` (the whole image: ``FULL_CROP``).
    """

    boxes: torch.Tensor
    class_ids: torch.Tensor
    group: torch.Tensor
    crop: tuple[float, float, float, float] = FULL_CROP

    def __len__(self) -> int:
        return int(self.class_ids.numel())

    def in_crop_frame(self) -> Layout:
        """The same layout with its boxes in the coordinates of the crop (what the picture shows), clipped to it;
        ``crop`` becomes ``FULL_CROP``."""
        x0, y0, x1, y1 = self.crop
        scale = torch.tensor([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=self.boxes.dtype)
        shift = torch.tensor([x0, y0, x0, y0], dtype=self.boxes.dtype)
        boxes = ((self.boxes - shift) / scale.clamp_min(1e-12)).clamp(0.0, 1.0)
        return Layout(boxes, self.class_ids, self.group, FULL_CROP)


class LayoutTokenizer:
    """Layouts <-> token sequences of length ``3 * max_objects (+ 2 with encode_crop)`` (see the module docstring).

    :param num_classes: number of object classes (class ids are ``0 .. num_classes - 1``).
    :param vocab_size: the conditioner's vocabulary ``V``; the padding token is ``V - 1``.
    :param max_objects: objects per sequence.
    :param encode_crop: append the two crop tokens (boxes are then in the frame of the uncropped image).
    :param use_group_flag: encode group (crowd) boxes as ``class_id + num_classes``.

    The defaults give the sequences of the released layout model (V = 8192, 30 objects, crop, group flag).
    """

    def __init__(self, num_classes: int, vocab_size: int = 8192, max_objects: int = 30, encode_crop: bool = True,
                 use_group_flag: bool = True) -> None:
        if num_classes < 1 or max_objects < 1:
            raise ValueError(f"LayoutTokenizer: num_classes and max_objects must be positive, got {num_classes} "
                             f"and {max_objects}")
        sections = math.isqrt(vocab_size) if vocab_size > 0 else 0
        if sections < 2:
            raise ValueError(f"LayoutTokenizer: vocab_size {vocab_size} is too small for a coordinate grid")
        if sections * sections > vocab_size - 1:
            raise ValueError(f"LayoutTokenizer: with vocab_size {vocab_size} (a perfect square) the coordinate grid "
                             f"{sections}x{sections} would use the padding token {vocab_size - 1}; use "
                             f"{vocab_size + 1} or another size that is not a square")
        class_tokens = num_classes * (2 if use_group_flag else 1)
        if class_tokens > vocab_size - 1:
            raise ValueError(f"LayoutTokenizer: {num_classes} classes{' with group flags' if use_group_flag else ''} "
                             f"need {class_tokens} class tokens, more than vocab_size - 1 = {vocab_size - 1}")
        self.num_classes = num_classes
        self.vocab_size = vocab_size
        self.max_objects = max_objects
        self.encode_crop = encode_crop
        self.use_group_flag = use_group_flag
        self.sections = sections

    def __repr__(self) -> str:
        return (f"LayoutTokenizer(num_classes={self.num_classes}, vocab_size={self.vocab_size}, "
                f"max_objects={self.max_objects}, encode_crop={self.encode_crop}, "
                f"use_group_flag={self.use_group_flag})")

    @property
    def pad_token(self) -> int:
        return self.vocab_size - 1

    @property
    def seq_len(self) -> int:
        """Tokens per layout (92 for the released model)."""
        return 3 * self.max_objects + (2 if self.encode_crop else 0)

    @property
    def step(self) -> float:
        """The quantisation step of a coordinate; decoding recovers coordinates within ``step / 2``."""
        return 1.0 / (self.sections - 1)

    # -- coordinates ------------------------------------------------------------------------------------------
    def point_tokens(self, xy: torch.Tensor) -> torch.Tensor:
        """Tokens of points: an [... x 2] Tensor of (x, y) in [0, 1] -> an [...] long Tensor."""
        q = torch.round(xy.double() * (self.sections - 1)).long()
        return q[..., 1] * self.sections + q[..., 0]

    def token_points(self, tokens: torch.Tensor) -> torch.Tensor:
        """Points of tokens: an [...] long Tensor -> an [... x 2] float Tensor of (x, y) in [0, 1]."""
        tokens = tokens.long()
        xy = torch.stack([tokens % self.sections, tokens // self.sections], dim=-1)
        return xy.float() / (self.sections - 1)

    def crop_tokens(self, crop: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The two tokens of a crop (x0, y0, x1, y1) in [0, 1]: a [2] long Tensor (the original's
        ``_crop_encoder``, which the patch-wise sampling of layouts uses to say where each patch lies)."""
        crop_t = torch.as_tensor(crop, dtype=torch.float64).reshape(2, 2)
        _check_box(crop_t.reshape(4), "crop")
        return self.point_tokens(crop_t)

    def with_crop(self, tokens: torch.Tensor, crop: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """`tokens` ([... x seq_len]) with their crop tokens replaced by those of `crop`."""
        if not self.encode_crop:
            raise ValueError("with_crop: this tokenizer does not encode the crop (encode_crop=False)")
        self._check_length(tokens)
        out = tokens.clone()
        out[..., -2:] = self.crop_tokens(crop).to(tokens.device)
        return out

    # -- encode / decode --------------------------------------------------------------------------------------
    def encode(self, boxes: torch.Tensor | Sequence[Sequence[float]], class_ids: torch.Tensor | Sequence[int],
               group: torch.Tensor | Sequence[bool] | None = None,
               crop: Sequence[float] | None = None) -> torch.Tensor:
        """Tokens of one layout.

        :param boxes: [K x 4] corners (x0, y0, x1, y1) in [0, 1] (in the uncropped image's frame with
            ``encode_crop``), K <= ``max_objects``.
        :param class_ids: [K] ids in ``[0, num_classes)``.
        :param group: [K] group (crowd) flags; all False when None.
        :param crop: (x0, y0, x1, y1) of the picture; default the whole image. Only with ``encode_crop``.
        :return: a [seq_len] long Tensor.
        :raises ValueError: naming the object, for a box outside [0, 1] or with x1 < x0 or y1 < y0, an unknown
            class id, or too many objects.
        """
        boxes_t = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        flags = torch.zeros_like(ids, dtype=torch.bool) if group is None else \
            torch.as_tensor(group, dtype=torch.bool).reshape(-1)
        k = boxes_t.shape[0]
        if ids.numel() != k or flags.numel() != k:
            raise ValueError(f"encode: {k} boxes, {ids.numel()} class ids and {flags.numel()} group flags")
        if k > self.max_objects:
            raise ValueError(f"encode: {k} objects, more than max_objects={self.max_objects}")
        if crop is not None and not self.encode_crop:
            raise ValueError("encode: a crop was given but this tokenizer does not encode it (encode_crop=False)")
        for i in range(k):
            _check_box(boxes_t[i], f"object {i}")
            if not 0 <= int(ids[i]) < self.num_classes:
                raise ValueError(f"encode: object {i} has class id {int(ids[i])}, not in [0, {self.num_classes})")
        classes = ids + self.num_classes * flags.long() if self.use_group_flag else ids
        corners = self.point_tokens(boxes_t.reshape(k, 2, 2))
        objects = torch.cat([classes[:, None], corners], dim=1).reshape(-1)
        pad = torch.full((3 * (self.max_objects - k),), self.pad_token, dtype=torch.long)
        parts = [objects, pad]
        if self.encode_crop:
            parts.append(self.crop_tokens(FULL_CROP if crop is None else crop))
        return torch.cat(parts)

    def encode_layout(self, layout: Layout) -> torch.Tensor:
        """:meth:`encode` of a :class:`Layout`."""
        return self.encode(layout.boxes, layout.class_ids, layout.group,
                           layout.crop if self.encode_crop else None)

    def decode(self, tokens: torch.Tensor) -> Layout | list[Layout]:
        """Layouts of token sequences: a [seq_len] Tensor -> a :class:`Layout`; [N x seq_len] -> a list.

        Padding objects (class token ``pad``) are left out, as the original's ``inverse_build`` does.

        :raises ValueError: for a sequence of the wrong length or a token outside the vocabulary.
        """
        tokens = torch.as_tensor(tokens).long().cpu()
        if tokens.ndim == 2:
            return [self.decode(row) for row in tokens]
        self._check_length(tokens)
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f"decode: tokens outside [0, {self.vocab_size}): {tokens.tolist()}")
        crop = FULL_CROP
        body = tokens
        if self.encode_crop:
            crop = tuple(float(v) for v in self.token_points(tokens[-2:]).reshape(4))
            body = tokens[:-2]
        triples = body.reshape(self.max_objects, 3)
        triples = triples[triples[:, 0] != self.pad_token]
        classes = triples[:, 0]
        n_class_tokens = self.num_classes * (2 if self.use_group_flag else 1)
        if bool((classes >= n_class_tokens).any()):
            raise ValueError(f"decode: class tokens {classes[classes >= n_class_tokens].tolist()} are not below "
                             f"{n_class_tokens} ({self!r})")
        boxes = self.token_points(triples[:, 1:]).reshape(-1, 4)
        if self.use_group_flag:
            group, class_ids = classes >= self.num_classes, classes % self.num_classes
        else:
            group, class_ids = torch.zeros_like(classes, dtype=torch.bool), classes
        return Layout(boxes, class_ids, group, crop)

    def null(self, batch_size: int = 1) -> torch.Tensor:
        """The empty layout (no objects, the whole image): a [batch_size x seq_len] long Tensor."""
        return self.encode(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).expand(batch_size, -1).clone()

    def _check_length(self, tokens: torch.Tensor) -> None:
        if tokens.shape[-1] != self.seq_len:
            raise ValueError(f"token sequences of length {tokens.shape[-1]} given to {self!r}, which makes "
                             f"sequences of {self.seq_len}")


def _check_box(box: torch.Tensor, what: str) -> None:
    """A box (x0, y0, x1, y1) must be finite, inside [0, 1] and not inverted."""
    values = [float(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}: box {values} is not finite")
    if min(values) < -_TOLERANCE or max(values) > 1.0 + _TOLERANCE:
        raise ValueError(f"{what}: box {values} is outside [0, 1]")
    if values[2] < values[0] or values[3] < values[1]:
        raise ValueError(f"{what}: box {values} has x1 < x0 or y1 < y0 (corners are (x0, y0, x1, y1))")
