"""The embedded emoji dataset: rendering, labels, captions, splits, augmentation and speed."""
import time
import unicodedata

import numpy as np
import pytest
import torch

from ldm.data.emoji import DEFAULT_EMOJI, EmojiDataset, render_emoji


def _plain(**kw):
    return EmojiDataset(size=32, augment=False, **kw)


def test_items_have_the_documented_format_and_labels():
    ds = EmojiDataset(size=32, split="train", repeats=2)
    assert len(ds) == 2 * len(DEFAULT_EMOJI) == 2 * ds.num_classes
    assert 16 <= ds.num_classes <= 64
    for i in (0, 1, ds.num_classes + 3):
        item = ds[i]
        assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["class_label"] == i % ds.num_classes
        char = DEFAULT_EMOJI[item["class_label"]]
        assert item["caption"] == unicodedata.name(char).lower() == item["human_label"]
        assert item["emoji"] == char
    assert ds[0]["caption"] == "grinning face"
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_glyph_is_centred_on_the_background_with_the_requested_margin():
    ds = EmojiDataset(size=64, augment=False, background=(0, 128, 255), margin=0.1)
    bg = np.array([0, 128, 255]) / 127.5 - 1.0
    for i in range(ds.num_classes):
        img = ds[i]["image"]
        assert np.allclose(img[0, 0], bg, atol=1e-6) and np.allclose(img[-1, -1], bg, atol=1e-6)
        fg = np.abs(img - bg).max(-1) > 0.05
        rows, cols = np.nonzero(fg)
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 0.7 * 64 <= extent <= 0.8 * 64 + 2  # fitted to (1 - 2 * margin) of the side
        centre = ((rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2)
        assert np.allclose(centre, 31.5, atol=2.0)
    # distinct classes look distinct
    imgs = np.stack([ds[i]["image"] for i in range(ds.num_classes)])
    dists = np.abs(imgs[:, None] - imgs[None]).mean(axis=(2, 3, 4))
    assert dists[~np.eye(len(imgs), dtype=bool)].min() > 0.02


def test_held_out_splits_are_fixed_and_differ_from_each_other():
    val_a, val_b = EmojiDataset(split="validation"), EmojiDataset(split="validation")
    test = EmojiDataset(split="test")
    for i in (0, 5, 40):
        assert np.array_equal(val_a[i]["image"], val_a[i]["image"])
        assert np.array_equal(val_a[i]["image"], val_b[i]["image"])
        assert not np.array_equal(val_a[i]["image"], test[i]["image"])
    # same class, different index: a different (fixed) augmentation
    n = val_a.num_classes
    assert not np.array_equal(val_a[0]["image"], val_a[n]["image"])
    assert not np.array_equal(EmojiDataset(split="validation", seed=1)[0]["image"], val_a[0]["image"])


def test_train_augmentation_is_random_but_reproducible_under_the_torch_seed():
    ds = EmojiDataset(split="train")
    torch.manual_seed(3)
    first = [ds[0]["image"], ds[0]["image"]]
    assert not np.array_equal(first[0], first[1])  # fresh draws
    torch.manual_seed(3)
    again = [ds[0]["image"], ds[0]["image"]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(4)
    assert not np.array_equal(ds[0]["image"], first[0])


def test_augmentations_are_small_enough_to_keep_the_class():
    canonical = _plain()
    refs = np.stack([canonical[i]["image"] for i in range(canonical.num_classes)])
    ds = EmojiDataset(split="validation")
    n, correct, changed = ds.num_classes, 0, 0
    for i in range(2 * n):
        img = ds[i]["image"]
        nearest = np.abs(refs - img).mean(axis=(1, 2, 3)).argmin()
        correct += int(nearest == ds[i]["class_label"])
        changed += int(not np.allclose(img, refs[i % n], atol=1e-3))
    assert changed == 2 * n
    assert correct >= 0.8 * 2 * n  # pixel-space nearest neighbour, shifted glyphs: a crude classifier


def test_zero_jitter_is_the_identity_and_flip_mirrors():
    plain = _plain()
    still = dict(scale_range=(1.0, 1.0), max_shift=0.0, max_rotation=0.0, color_jitter=0.0, size=32)
    same = EmojiDataset(**still, flip_p=0.0)
    flipped = EmojiDataset(**still, flip_p=1.0)
    for i in (0, 7):
        assert np.allclose(same[i]["image"], plain[i]["image"], atol=1e-5)
        assert np.allclose(flipped[i]["image"], plain[i]["image"][:, ::-1], atol=1e-5)


def test_subset_selection_by_character_name_and_code_point():
    ds = _plain(names=["\U0001F436", "cat face", "1F34E", "U+1F34C", "\u2764\ufe0f"], repeats=1)
    assert ds.captions == ["dog face", "cat face", "red apple", "banana", "heavy black heart"]
    assert len(ds) == 5 and [ds[i]["class_label"] for i in range(5)] == [0, 1, 2, 3, 4]
    assert _plain(max_classes=5).num_classes == 5
    assert len(_plain(length=1000)) == 1000


@pytest.mark.parametrize("bad, match", [
    (dict(names=["no such emoji name"]), "no such emoji name"),
    (dict(names=["A"]), "no glyph"),
    (dict(names=["dog face", "\U0001F436"]), "twice"),
    (dict(split="training"), "split"),
])
def test_bad_arguments_give_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        _plain(**bad)


def test_rendering_the_default_set_is_fast():
    render_emoji.cache_clear()
    start = time.perf_counter()
    ds = EmojiDataset(size=32)
    for i in range(256):
        ds[i]
    # about 0.3 s to render and 1 ms per item on a free core; generous for a shared machine
    assert time.perf_counter() - start < 6.0


def test_batches_collate_for_training():
    loader = torch.utils.data.DataLoader(EmojiDataset(size=16, repeats=1), batch_size=8)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == torch.float32
    assert batch["class_label"].tolist() == list(range(8)) and len(batch["caption"]) == 8
