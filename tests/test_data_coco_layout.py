"""COCO-style layout files, the layout dataset (crops move boxes along), the emoji layout set and layout drawing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.base import CropParams
from ldm.data.coco_layout import CocoLayoutDataset, crop_boxes
from ldm.data.emoji_layout import make_emoji_layout_set
from ldm.data.layout import Layout
from ldm.data.layout_draw import class_colour, draw_layout
from ldm.data.layout_json import LayoutFileError, read_layout_file


@pytest.fixture(scope="module")
def emoji_set(tmp_path_factory) -> Path:
    return make_emoji_layout_set(tmp_path_factory.mktemp("emoji_layout"), num_images=12, size=48, seed=3)


def write_coco(tmp_path: Path, annotations, categories=None, images=None, name="instances.json") -> Path:
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}]
    data = {"images": images, "annotations": annotations}
    if categories is not False:
        data["categories"] = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- the JSON reader ------------------------------------------------------------------------------------------
def test_reader_maps_categories_to_class_ids_and_boxes_to_corners(tmp_path):
    path = write_coco(tmp_path, [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [4, 2, 10, 8]},
                                 {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 10, 20, 20]}])
    parsed = read_layout_file(path)
    assert parsed.class_names == ("cat", "dog")
    (image,) = parsed.images
    assert [o.class_id for o in image.objects] == [1, 0]
    assert image.objects[0].box == (4.0, 2.0, 14.0, 10.0)
    assert image.objects[1].box == (30.0, 10.0, 40.0, 20.0)  # pixel boxes are clipped to the 40x20 image
    # class_names choose and order the classes; other categories are left out and counted
    only_dogs = read_layout_file(path, class_names=["dog"])
    assert [o.class_id for o in only_dogs.images[0].objects] == [0] and only_dogs.skipped_classes == 1


def test_crowd_boxes_are_skipped_flagged_or_kept(tmp_path):
    path = write_coco(tmp_path, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
                                 {"image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 0}])
    skip = read_layout_file(path, crowd="skip")
    assert len(skip.images[0].objects) == 1 and skip.skipped_crowd == 1
    group = read_layout_file(path, crowd="group")
    assert [o.group for o in group.images[0].objects] == [True, False]
    keep = read_layout_file(path, crowd="keep")
    assert [o.group for o in keep.images[0].objects] == [False, False]
    with pytest.raises(ValueError, match="unknown crowd 'drop'"):
        read_layout_file(path, crowd="drop")


def test_a_normalised_box_outside_the_unit_square_names_file_and_entry(tmp_path):
    path = write_coco(tmp_path, [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [0.1, 0.1, 0.2, 0.2]},
                                 {"id": 6, "image_id": 1, "category_id": 3, "bbox": [0.5, 0.5, 0.6, 0.2]}])
    with pytest.raises(LayoutFileError, match=f"{path}: annotations\\[1\\] \\(id 6\\): bbox .* outside \\[0, 1\\]"):
        read_layout_file(path, normalized=True)


def test_an_unknown_class_name_names_file_and_entry(tmp_path):
    path = write_coco(tmp_path, [{"image_id": 1, "category": "cat", "bbox": [0.1, 0.1, 0.2, 0.2]},
                                 {"image_id": 1, "category": "unicorn", "bbox": [0.1, 0.1, 0.2, 0.2]}],
                      categories=False, images=[{"id": 1}])
    with pytest.raises(LayoutFileError, match=f"{path}: annotations\\[1\\] has the unknown class name 'unicorn'"):
        read_layout_file(path, class_names=["cat", "dog"], normalized=True)
    ok = read_layout_file(path, class_names=["cat", "dog", "unicorn"], normalized=True)
    assert [o.class_id for o in ok.images[0].objects] == [0, 2]
    with pytest.raises(LayoutFileError, match="unknown class name\\(s\\) \\['horse'\\]"):
        read_layout_file(write_coco(tmp_path, [], name="b.json"), class_names=["cat", "horse"])


@pytest.mark.parametrize("annotation, message", [
    ({"id": 9, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}, "annotations\\[0\\] \\(id 9\\) refers to "
                                                                        "image_id 2"),
    ({"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}, "annotations\\[0\\] has category_id 4"),
    ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 1]}, "annotations\\[0\\]: 'bbox' must be four numbers"),
    ({"image_id": 1, "category_id": 3, "bbox": [0, 0, -1, 1]}, "annotations\\[0\\]: bbox .* negative width"),
    ({"image_id": 1, "bbox": [0, 0, 1, 1]}, "annotations\\[0\\] needs 'category_id'"),
])
def test_malformed_annotations_name_file_and_entry(tmp_path, annotation, message):
    path = write_coco(tmp_path, [annotation])
    with pytest.raises(LayoutFileError, match=f"{path}: {message}"):
        read_layout_file(path)


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayoutFileError, match=f"{bad}: not valid JSON"):
        read_layout_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_layout_file(tmp_path / "missing.json")
    no_size = write_coco(tmp_path, [], images=[{"id": 1, "file_name": "a.png"}], name="c.json")
    with pytest.raises(LayoutFileError, match="images\\[0\\] \\(id 1\\) needs a positive 'width'"):
        read_layout_file(no_size)


# -- crops move the boxes -------------------------------------------------------------------------------------
def test_crop_boxes_clips_drops_small_and_reframes():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0],     # inside the crop
                          [0.0, 40.0, 25.0, 60.0],      # partly outside: clipped at x=20
                          [0.0, 0.0, 19.0, 100.0],      # entirely left of the crop: dropped
                          [79.0, 50.0, 90.0, 60.0]])    # 1 source pixel inside = 0.5 output px: dropped
    crop = CropParams((20, 0, 80, 60), flip=False)
    out, keep, frame = crop_boxes(boxes, (100, 60), crop, out_size=30, min_box_size=1.0, encode_crop=False)
    assert keep.tolist() == [0, 1] and frame == (0.0, 0.0, 1.0, 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 10 / 60, 10 / 60, 0.5], [0.0, 40 / 60, 5 / 60, 1.0]]))
    # with encode_crop the boxes stay in the whole image's frame and the crop is returned
    out, keep, frame = crop_boxes(boxes, (100, 60), crop, out_size=30, min_box_size=1.0, encode_crop=True)
    assert frame == pytest.approx((0.2, 0.0, 0.8, 1.0))
    torch.testing.assert_close(out[1], torch.tensor([0.2, 40 / 60, 0.25, 1.0]))
    # a mirrored crop mirrors boxes and crop
    flipped, _, frame = crop_boxes(boxes, (100, 60), CropParams((20, 0, 80, 60), flip=True), 30, 1.0, True)
    assert frame == pytest.approx((0.2, 0.0, 0.8, 1.0))
    torch.testing.assert_close(flipped[1], torch.tensor([0.75, 40 / 60, 0.8, 1.0]))


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels that are not the white background ([H x W] bool) of an image in [-1, 1]."""
    return (image < 0.9).any(axis=-1)


def box_mask(layout: Layout, size: int, margin: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in (layout.in_crop_frame().boxes * size).tolist():
        mask[max(0, int(y0) - margin):int(np.ceil(y1)) + margin, max(0, int(x0) - margin):int(np.ceil(x1)) + margin] = 1
    return mask


@pytest.mark.parametrize("crop_kwargs", [dict(), dict(random_crop=True, min_crop_f=0.5, max_crop_f=0.8, flip_p=0.5)])
def test_every_emoji_pixel_lies_inside_a_decoded_box(emoji_set, crop_kwargs):
    ds = CocoLayoutDataset(emoji_set, emoji_set.parent, size=32, max_objects=3, seed=0, shuffle_objects=True,
                           min_box_size=0.0, **crop_kwargs)
    assert ds.tokenizer.seq_len == 11 and ds.class_names[0] == "grinning face"
    inside = []
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (32, 32, 3) and item["coordinates_bbox"].shape == (11,)
        layout = ds.tokenizer.decode(item["coordinates_bbox"])
        fg = foreground(item["image"])
        mask = box_mask(layout, 32)
        assert not (fg & ~mask).any(), f"item {i}: emoji pixels outside every box"
        inside.append(fg[mask].mean() if mask.any() else 1.0)
    assert np.mean(inside) > 0.3  # the boxes are tight: emoji fill them


def test_layout_tokens_follow_the_annotation_file(emoji_set):
    ds = CocoLayoutDataset(emoji_set, emoji_set.parent, size=48, max_objects=3)
    data = json.loads(emoji_set.read_text())
    item = ds[0]
    layout = ds.tokenizer.decode(item["coordinates_bbox"])
    expected = [a for a in data["annotations"] if a["image_id"] == 0]
    assert layout.class_ids.tolist() == [a["category_id"] for a in expected]
    for box, ann in zip(layout.boxes.tolist(), expected):
        x, y, w, h = (v / 48 for v in ann["bbox"])
        assert box == pytest.approx([x, y, x + w, y + h], abs=ds.tokenizer.step / 2 + 1e-6)


def test_images_with_many_boxes_keep_the_largest(tmp_path):
    Image.new("RGB", (40, 40), "white").save(tmp_path / "a.png")
    sides = [4, 12, 8, 16, 6]
    anns = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, s, s]} for s in sides]
    path = write_coco(tmp_path, anns, images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 40}])
    ds = CocoLayoutDataset(path, tmp_path, size=40, max_objects=2, encode_crop=False)
    widths = sorted(round(float(b[2] * 40)) for b in ds.tokenizer.decode(ds[0]["coordinates_bbox"]).boxes)
    assert widths == [12, 16]


def test_missing_images_are_skipped_and_counted_or_named(tmp_path):
    Image.new("RGB", (40, 20), "white").save(tmp_path / "a.png")
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
              {"id": 2, "file_name": "gone.png", "width": 40, "height": 20}]
    anns = [{"image_id": i, "category_id": 3, "bbox": [0, 0, 5, 5]} for i in (1, 2)]
    path = write_coco(tmp_path, anns, images=images)
    ds = CocoLayoutDataset(path, tmp_path, size=16)
    assert len(ds) == 1 and ds.missing == 1
    with pytest.raises(FileNotFoundError, match=f"{path}: images\\[1\\] \\(id 2\\): image file .*gone.png"):
        CocoLayoutDataset(path, tmp_path, size=16, missing_images="error")


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    Image.new("RGB", (40, 20), "white").save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not a png")
    images = [{"id": i, "file_name": f, "width": 40, "height": 20} for i, f in ((1, "a.png"), (2, "b.png"))]
    anns = [{"image_id": i, "category_id": 3, "bbox": [0, 0, 5, 5]} for i in (1, 2)]
    ds = CocoLayoutDataset(write_coco(tmp_path, anns, images=images), tmp_path, size=16)
    assert ds[1]["image_id"] == "1" and ds.skipped == 1


# -- the emoji set and drawing ----------------------------------------------------------------------------------
def test_emoji_set_boxes_are_tight_around_the_glyphs(emoji_set):
    data = json.loads(emoji_set.read_text())
    assert len(data["images"]) == 12 and {c["name"] for c in data["categories"]} >= {"grinning face"}
    for image in data["images"]:
        pixels = np.asarray(Image.open(emoji_set.parent / image["file_name"]), dtype=np.float32) / 127.5 - 1
        fg = foreground(pixels)
        mask = np.zeros_like(fg)
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            mask[y:y + h, x:x + w] = True
            assert fg[y:y + h, x:x + w].any(axis=0)[[0, -1]].all()  # glyph pixels touch the box's left/right
        assert not (fg & ~mask).any()


def test_draw_layout_outlines_boxes_in_the_class_colour():
    layout = Layout(torch.tensor([[0.25, 0.25, 0.75, 0.5]]), torch.tensor([2]), torch.tensor([False]))
    image = torch.full((3, 40, 40), -1.0)
    drawn = draw_layout(layout, image, line_width=1, labels=False)
    colour = torch.tensor(class_colour(2), dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(drawn[:, 10, 10:30], colour[:, None].expand(3, 20))  # top edge
    torch.testing.assert_close(drawn[:, 10:20, 29], colour[:, None].expand(3, 10))  # right edge x = 0.75*40 - 1
    assert torch.equal(drawn[:, 12:18, 12:28], image[:, 12:18, 12:28])  # interior untouched
    assert torch.equal(drawn[:, 25:, :], image[:, 25:, :])  # outside untouched


def test_layout_agreement_is_high_for_the_true_layouts_and_low_for_others(emoji_set):
    from ldm.data.emoji_layout import layout_agreement

    ds = CocoLayoutDataset(emoji_set, emoji_set.parent, size=48, max_objects=3)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([torch.from_numpy(it["image"]).permute(2, 0, 1) for it in items])
    layouts = [ds.tokenizer.decode(it["coordinates_bbox"]) for it in items]
    own = layout_agreement(images, layouts)
    others = layout_agreement(images, layouts[1:] + layouts[:1])
    assert own.min() > 0.5 and others.mean() < 0.3, (own, others)
    blank = torch.ones(1, 3, 48, 48)
    assert layout_agreement(blank, [layouts[0]]) == 0.0


def test_own_and_other_agreement_compares_each_picture_with_another_pictures_layout(emoji_set):
    from ldm.data.emoji_layout import layout_agreement, other_layouts, own_and_other_agreement

    ds = CocoLayoutDataset(emoji_set, emoji_set.parent, size=48, max_objects=3)
    images = torch.stack([torch.from_numpy(ds[i]["image"]).permute(2, 0, 1) for i in range(len(ds))])
    layouts = [ds.tokenizer.decode(ds[i]["coordinates_bbox"]) for i in range(len(ds))]
    others = other_layouts(layouts, seed=5)
    # a derangement: every layout is handed to exactly one other picture
    picks = [next(j for j, layout in enumerate(layouts) if layout is other) for other in others]
    assert sorted(picks) == list(range(len(layouts))) and all(j != i for i, j in enumerate(picks))
    assert [id(x) for x in other_layouts(layouts, seed=5)] == [id(x) for x in others]  # the same for a seed
    own, other = own_and_other_agreement(images, layouts, seed=5)
    assert own == pytest.approx(float(layout_agreement(images, layouts).mean()))
    assert other == pytest.approx(float(layout_agreement(images, others).mean()))
    assert own > 0.6 and other < 0.3 and own > 3 * other  # the true pictures follow their layouts
    # pictures that ignore their layouts (each shows another picture's objects) score no better with their own
    ignoring = images.roll(1, dims=0)
    own_i, other_i = own_and_other_agreement(ignoring, layouts, seed=5)
    assert own_i < 0.3 and other_i < 0.3
    with pytest.raises(ValueError, match="at least 2 layouts"):
        other_layouts(layouts[:1])


def test_a_hand_written_layout_file_becomes_model_tokens(tmp_path):
    from ldm.data.layout import LayoutTokenizer
    from ldm.data.layout_json import encode_layout_file

    anns = [{"image_id": "a", "category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]},
            {"image_id": "a", "category": "cat", "bbox": [0.5, 0.5, 0.5, 0.5]},
            {"image_id": "b", "category": "cat", "bbox": [0.0, 0.0, 1.0, 1.0], "iscrowd": 1}]
    path = write_coco(tmp_path, anns, categories=False, images=[{"id": "a"}, {"id": "b"}])
    tok = LayoutTokenizer(num_classes=2, max_objects=2)
    tokens, ids = encode_layout_file(path, tok, ["cat", "dog"])
    assert ids == ["a", "b"] and tokens.shape == (2, tok.seq_len)
    a, b = tok.decode(tokens)
    assert a.class_ids.tolist() == [1, 0] and b.group.tolist() == [True]
    torch.testing.assert_close(a.boxes[0], torch.tensor([0.1, 0.2, 0.4, 0.6]), atol=tok.step / 2, rtol=0)
    with pytest.raises(LayoutFileError, match="images\\[0\\] \\(id a\\) has 2 boxes; the model takes at most 1"):
        encode_layout_file(path, LayoutTokenizer(num_classes=2, max_objects=1), ["cat", "dog"])
    with pytest.raises(LayoutFileError, match="annotations\\[0\\] has the unknown class name 'dog'"):
        encode_layout_file(path, LayoutTokenizer(num_classes=2), ["cat", "cow"])
