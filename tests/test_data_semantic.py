"""Semantic maps: one-hot segmentation aligned with the image under crops and flips; bad maps skipped."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.semantic import SegmentationBase
from tests.test_data_base import write_image


def label_tree(tmp_path, n=3, h=30, w=40, n_labels=5):
    """Images whose grey level encodes the label (label * 50), and their label maps."""
    for i in range(n):
        rng = np.random.default_rng(i)
        labels = np.repeat(np.repeat(rng.integers(0, n_labels, (h // 5, w // 5)), 5, 0), 5, 1).astype(np.uint8)
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "seg").mkdir(exist_ok=True)
        Image.fromarray(np.repeat((labels * 50)[..., None], 3, axis=2)).save(tmp_path / "img" / f"{i}.jpg",
                                                                               quality=100)
        Image.fromarray(labels).save(tmp_path / "seg" / f"{i}.png")


def test_one_hot_segmentation_stays_aligned_with_the_image(tmp_path):
    label_tree(tmp_path)
    ds = SegmentationBase(data_root=str(tmp_path / "img"), segmentation_root=str(tmp_path / "seg"), size=20,
                          random_crop=True, flip_p=0.5, interpolation="nearest", n_labels=5, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        seg = item["segmentation"]
        assert seg.shape == (20, 20, 5) and seg.dtype == np.float32
        assert np.array_equal(seg.sum(-1), np.ones((20, 20)))
        grey = (item["image"][..., 0] + 1) * 127.5
        assert np.abs(grey - seg.argmax(-1) * 50).max() < 8  # JPEG noise only: same crop, same flip
        assert item["segmentation_path_"].endswith(f"{i}.png")


def test_file_list_shift_and_bad_maps_are_skipped_and_counted(tmp_path):
    label_tree(tmp_path, n=3)
    Image.fromarray(np.full((30, 40), 255, np.uint8)).save(tmp_path / "seg" / "1.png")  # 255 = unlabelled
    (tmp_path / "list.txt").write_text("0.jpg\n1.jpg\n2.jpg\n")
    ds = SegmentationBase(str(tmp_path / "list.txt"), str(tmp_path / "img"), str(tmp_path / "seg"), size=16,
                          n_labels=5)
    assert ds[1]["relative_file_path_"] == "2.jpg" and ds.skipped == 1  # 255 >= n_labels
    shifted = SegmentationBase(str(tmp_path / "list.txt"), str(tmp_path / "img"), str(tmp_path / "seg"), size=16,
                               n_labels=6, shift_segmentation=True)
    assert (shifted[1]["segmentation"].argmax(-1) == 0).all()  # 255 + 1 wraps to 0 as in taming
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "seg" / "2.png")  # RGB map
    write_image(tmp_path / "img" / "3.jpg", "rgb")  # no map at all
    bad = SegmentationBase(data_root=str(tmp_path / "img"), segmentation_root=str(tmp_path / "seg"), size=16,
                           n_labels=5)
    got = [bad[i]["relative_file_path_"] for i in range(4)]
    assert got == ["0.jpg", "0.jpg", "0.jpg", "0.jpg"] and bad.skipped == 3 + 2 + 1
    with pytest.raises(FileNotFoundError, match="segmentation_root"):
        SegmentationBase(data_root=str(tmp_path / "img"), segmentation_root=str(tmp_path / "none"))
