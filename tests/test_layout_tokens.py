"""Layout tokens: the sequence format of the CompVis "objects_bbox" builder, and round trips."""
from __future__ import annotations

import math
import random

import pytest
import torch

from ldm.data.layout import FULL_CROP, Layout, LayoutTokenizer


def reference_tokens(objects, crop, no_tokens=8192, max_objects=30, no_classes=10, group_flag=True):
    """The taming-transformers builder's sequence, written out scalar by scalar from its description:
    objects are (category_no, is_group_of, (x0, y0, w, h)); a point is round(y*(S-1))*S + round(x*(S-1))."""
    sections = int(math.sqrt(no_tokens))
    pad = no_tokens - 1

    def point(x, y):
        return int(round(y * (sections - 1))) * sections + int(round(x * (sections - 1)))

    out = []
    for category, group, (x, y, w, h) in objects:
        out += [category + no_classes * (1 if (group and group_flag) else 0), point(x, y), point(x + w, y + h)]
    out += [pad] * (3 * (max_objects - len(objects)))
    if crop is not None:
        x, y, w, h = crop
        out += [point(x, y), point(x + w, y + h)]
    return out


def random_objects(rng: random.Random, k: int, num_classes: int):
    objects = []
    for _ in range(k):
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        objects.append((rng.randrange(num_classes), rng.random() < 0.3, (x0, y0, x1 - x0, y1 - y0)))
    return objects


def test_released_model_sequence_length_and_grid():
    tok = LayoutTokenizer(num_classes=601)
    assert tok.seq_len == 92  # = max_seq_len of the released layout2img-openimages256 BERTEmbedder
    assert tok.sections == 90 and tok.pad_token == 8191
    assert tok.step == pytest.approx(1 / 89)


@pytest.mark.parametrize("seed", range(5))
def test_tokens_match_the_original_builder_formula(seed):
    rng = random.Random(seed)
    objects = random_objects(rng, rng.randrange(0, 31), 10)
    cx0, cx1 = sorted(rng.random() for _ in range(2))
    cy0, cy1 = sorted(rng.random() for _ in range(2))
    tok = LayoutTokenizer(num_classes=10)
    boxes = [(x, y, x + w, y + h) for _, _, (x, y, w, h) in objects]
    tokens = tok.encode(boxes, [c for c, _, _ in objects], [g for _, g, _ in objects], crop=(cx0, cy0, cx1, cy1))
    assert tokens.dtype == torch.long and tokens.shape == (92,)
    assert tokens.tolist() == reference_tokens(objects, (cx0, cy0, cx1 - cx0, cy1 - cy0))


def test_tokens_without_crop_or_group_flag():
    rng = random.Random(7)
    objects = random_objects(rng, 4, 5)
    tok = LayoutTokenizer(num_classes=5, vocab_size=1025, max_objects=6, encode_crop=False, use_group_flag=False)
    boxes = [(x, y, x + w, y + h) for _, _, (x, y, w, h) in objects]
    tokens = tok.encode(boxes, [c for c, _, _ in objects], [g for _, g, _ in objects])
    assert tokens.shape == (18,)
    assert tokens.tolist() == reference_tokens(objects, None, 1025, 6, 5, group_flag=False)


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_within_half_a_quantisation_step(seed):
    rng = random.Random(seed)
    tok = LayoutTokenizer(num_classes=7)
    objects = random_objects(rng, rng.randrange(1, 31), 7)
    boxes = torch.tensor([(x, y, x + w, y + h) for _, _, (x, y, w, h) in objects], dtype=torch.float64)
    ids = torch.tensor([c for c, _, _ in objects])
    group = torch.tensor([g for _, g, _ in objects])
    crop = (0.1, 0.05, 0.9, 0.85)
    layout = tok.decode(tok.encode(boxes, ids, group, crop))
    assert isinstance(layout, Layout) and len(layout) == len(objects)
    assert torch.equal(layout.class_ids, ids) and torch.equal(layout.group, group)
    assert (layout.boxes.double() - boxes).abs().max() <= tok.step / 2 + 1e-6
    assert max(abs(a - b) for a, b in zip(layout.crop, crop)) <= tok.step / 2 + 1e-6
    # and tokens -> layout -> tokens is exact
    tokens = tok.encode_layout(layout)
    assert torch.equal(tok.encode_layout(tok.decode(tokens)), tokens)


def test_decode_a_batch_and_the_null_layout():
    tok = LayoutTokenizer(num_classes=3, max_objects=4)
    a = tok.encode([[0.0, 0.0, 0.5, 0.5]], [2])
    null = tok.null(2)
    assert null.shape == (2, tok.seq_len) and (null[:, :-2] == tok.pad_token).all()
    layouts = tok.decode(torch.stack([a, null[0]]))
    assert [len(x) for x in layouts] == [1, 0]
    assert layouts[1].crop == FULL_CROP and layouts[0].class_ids.tolist() == [2]


def test_with_crop_replaces_only_the_crop_tokens():
    tok = LayoutTokenizer(num_classes=3, max_objects=2)
    tokens = tok.encode([[0.2, 0.2, 0.4, 0.6]], [1])[None].repeat(3, 1)
    patched = tok.with_crop(tokens, (0.5, 0.0, 1.0, 0.5))
    assert torch.equal(patched[:, :-2], tokens[:, :-2])
    assert tok.decode(patched[0]).crop == pytest.approx((0.5, 0.0, 1.0, 0.5), abs=tok.step / 2)


def test_in_crop_frame_maps_the_crop_to_the_unit_square():
    layout = Layout(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), torch.tensor([0]), torch.tensor([False]),
                    (0.25, 0.5, 0.75, 1.0))
    inner = layout.in_crop_frame()
    assert inner.crop == FULL_CROP
    torch.testing.assert_close(inner.boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


@pytest.mark.parametrize("boxes, ids, message", [
    ([[0.1, 0.1, 1.2, 0.5]], [0], "object 0: box .* outside \\[0, 1\\]"),
    ([[0.1, 0.1, 0.5, 0.5], [0.6, 0.5, 0.4, 0.9]], [0, 1], "object 1: .*x1 < x0"),
    ([[0.1, 0.1, 0.5, 0.5]], [3], "object 0 has class id 3"),
    ([[0.0, 0.0, 0.1, 0.1]] * 3, [0, 0, 0], "3 objects, more than max_objects=2"),
    ([[float("nan"), 0.0, 0.1, 0.1]], [0], "not finite"),
])
def test_encode_errors_name_the_object(boxes, ids, message):
    tok = LayoutTokenizer(num_classes=3, max_objects=2)
    with pytest.raises(ValueError, match=message):
        tok.encode(boxes, ids)


def test_decode_rejects_foreign_sequences():
    tok = LayoutTokenizer(num_classes=3, max_objects=2)
    with pytest.raises(ValueError, match="length 7"):
        tok.decode(torch.zeros(7, dtype=torch.long))
    bad = tok.null(1)[0]
    bad[0] = 6  # class token beyond 2 * num_classes
    with pytest.raises(ValueError, match="class tokens \\[6\\]"):
        tok.decode(bad)


def test_vocabularies_that_cannot_hold_the_grid_are_refused():
    with pytest.raises(ValueError, match="perfect square"):
        LayoutTokenizer(num_classes=3, vocab_size=1024)  # a 32x32 grid would reach the padding token 1023
    with pytest.raises(ValueError, match="class tokens"):
        LayoutTokenizer(num_classes=600, vocab_size=1025)  # 1200 class tokens with group flags
