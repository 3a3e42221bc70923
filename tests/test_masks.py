"""LaMa-style inpainting masks: determinism, coverage, stroke widths, boxes, and the inpainting wrapper."""
import numpy as np
import pytest
from scipy import ndimage

from ldm.data.emoji import EmojiDataset
from ldm.data.inpainting import InpaintingDataset
from ldm.data.masks import BoxParams, MaskGenerator, draw_boxes, draw_strokes, StrokeParams


def masks(kind, n=60, side=128, seed=0):
    gen, rng = MaskGenerator(kind), np.random.default_rng(seed)
    return [gen(side, side, rng) for _ in range(n)]


def stroke_half_width(mask):
    """Largest distance from a hole pixel to the nearest kept pixel: about half the widest stroke."""
    return ndimage.distance_transform_edt(mask).max()


@pytest.mark.parametrize("kind", ["thin", "medium", "thick", "box", "mixed"])
def test_masks_are_binary_seeded_and_within_the_coverage_limit(kind):
    a, b, c = masks(kind, 20), masks(kind, 20), masks(kind, 20, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    for m in a:
        assert m.shape == (128, 128) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
        assert 0 < m.mean() <= 0.5


def test_stroke_widths_order_thin_medium_thick_as_lama():
    gen = np.random.default_rng(0)
    widths = {}
    for kind, max_width, max_len in (("thin", 10, 40), ("medium", 50, 100), ("thick", 100, 200)):
        one_stroke = StrokeParams(min_times=1, max_times=1, max_width=max_width, max_len=max_len)
        widths[kind] = np.median([stroke_half_width(draw_strokes(256, 256, one_stroke, gen)) for _ in range(30)])
    # brush widths are 5 + U{0..max_width-1}: half widths at most (5 + max_width) / 2 (+ rasterisation)
    assert widths["thin"] <= (5 + 10) / 2 + 1.5
    assert widths["thin"] < widths["medium"] < widths["thick"] <= (5 + 100) / 2 + 1.5
    thin = masks("thin", 40)
    n_parts = np.median([ndimage.label(m)[1] for m in thin])
    assert n_parts >= 2  # many separate thin strokes


def test_mean_coverage_is_substantial_and_scales_with_the_image():
    for kind in ("thin", "thick", "mixed"):
        small = np.mean([m.mean() for m in masks(kind, 60, side=64)])
        large = np.mean([m.mean() for m in masks(kind, 60, side=256)])
        assert 0.08 < small < 0.45 and 0.08 < large < 0.45
        assert 0.6 < small / large < 1.6  # parameters scale with the side


def test_boxes_are_rectangles_inside_the_margin():
    rng = np.random.default_rng(3)
    params = BoxParams(min_times=1, max_times=1, bbox_min_size=30, bbox_max_size=150, margin=10)
    for _ in range(20):
        m = draw_boxes(256, 256, params, rng)
        rows, cols = np.nonzero(m)
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one filled rectangle
        assert rows.min() >= 10 and cols.min() >= 10 and rows.max() < 246 and cols.max() < 246
        assert 30 <= rows.max() - rows.min() + 1 < 150
    with pytest.raises(ValueError, match="do not fit"):
        draw_boxes(40, 40, params, rng)
    with pytest.raises(ValueError, match="mask kind"):
        MaskGenerator("wide")


def test_inpainting_wrapper_adds_mask_and_masked_image():
    base = {"target": "ldm.data.emoji.EmojiDataset", "params": {"size": 32, "split": "validation"}}
    ds = InpaintingDataset(base, mask_kind="thick", seed=0)
    assert len(ds) == len(EmojiDataset(split="validation"))
    item = ds[3]
    assert item["mask"].shape == (32, 32, 1) and item["masked_image"].shape == (32, 32, 3)
    assert np.array_equal(item["masked_image"], item["image"] * (1 - item["mask"]))
    hole = item["mask"][..., 0] == 1
    assert hole.any() and (item["masked_image"][hole] == 0).all()
    assert np.array_equal(ds[3]["mask"], item["mask"])  # fixed masks for evaluation
    train = InpaintingDataset(EmojiDataset(size=32, split="validation"), mask_kind="mixed")
    assert not np.array_equal(train[3]["mask"], train[3]["mask"])
