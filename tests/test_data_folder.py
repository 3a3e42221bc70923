"""ImageFolderDataset: captions from .txt / CSV / JSONL, class sub-folders, bad files, missing root."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import ImageFolderDataset
from ldm.util import ConfigError
from tests.test_data_base import natural, write_image


def tree(root, kinds=("rgb", "gray", "cmyk", "rgba", "corrupt", "tiny"), sub=""):
    paths = []
    for i, kind in enumerate(kinds):
        p = write_image(root / sub / f"{i}_{kind}.png", kind, natural("coffee", side=36))
        paths.append(p if p.exists() else p.with_suffix(".jpg" if kind == "cmyk" else ".png"))
    return paths


def test_txt_captions_every_mode_and_bad_files_are_skipped_and_counted(tmp_path):
    paths = tree(tmp_path)
    for p in paths[:3]:
        p.with_suffix(".txt").write_text(f"  a photo of {p.stem}\n")
    ds = ImageFolderDataset(str(tmp_path), size=24, captions="txt")
    assert len(ds) == 6 and ds.missing_captions == 3
    items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 2 + 1  # corrupt and tiny at index 4; tiny again at index 5 (wraps around to 0)
    by_path = {it["relpath"]: it for it in items}
    for p in paths[:3]:
        assert by_path[p.name]["caption"] == f"a photo of {p.stem}"
    assert by_path[paths[3].name]["caption"] == ""
    for it in items:
        assert it["image"].shape == (24, 24, 3) and -1 <= it["image"].min() <= it["image"].max() <= 1
    # gray became three equal channels, RGBA kept its colours where opaque
    gray = by_path[paths[1].name]["image"]
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_csv_and_jsonl_captions_list_the_images(tmp_path):
    tree(tmp_path / "imgs", kinds=("rgb", "rgb", "rgb"))
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    (tmp_path / "meta.csv").write_text("file_name,caption\n" + f"{names[2]},third\n{names[0]},\"first, quoted\"\n"
                                       + "gone.png,missing\n")
    ds = ImageFolderDataset(str(tmp_path / "imgs"), size=16, captions=f"csv:{tmp_path / 'meta.csv'}")
    assert [(ds[i]["relpath"], ds[i]["caption"]) for i in range(len(ds))] == [(names[2], "third"),
                                                                             (names[0], "first, quoted")]
    (tmp_path / "imgs" / "meta.jsonl").write_text(json.dumps({"file": names[1], "text": "second"}) + "\n")
    js = ImageFolderDataset(str(tmp_path / "imgs"), size=16, captions="jsonl:meta.jsonl")  # found inside root
    assert len(js) == 1 and js[0]["caption"] == "second"
    (tmp_path / "bad.csv").write_text("name,words\nx.png,y\n")
    with pytest.raises(ConfigError, match="file_name"):
        ImageFolderDataset(str(tmp_path / "imgs"), captions=f"csv:{tmp_path / 'bad.csv'}")
    with pytest.raises(ConfigError, match="captions"):
        ImageFolderDataset(str(tmp_path / "imgs"), captions="yaml:x")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ImageFolderDataset(str(tmp_path / "imgs"), captions="csv:nope.csv")


def test_class_subfolders_give_sorted_labels(tmp_path):
    for cls in ("zebra", "apple"):
        tree(tmp_path, kinds=("rgb", "gray"), sub=cls)
    write_image(tmp_path / "loose.png", "rgb", natural(side=20))
    ds = ImageFolderDataset(str(tmp_path), size=8, class_subfolders=True)
    assert len(ds) == 4 and ds.classes == ["apple", "zebra"]
    for i in range(4):
        it = ds[i]
        assert it["human_label"] == it["relpath"].split("/")[0]
        assert it["class_label"] == ds.classes.index(it["human_label"])


def test_random_crops_scale_range_flip_and_determinism(tmp_path):
    arr = natural("astronaut", side=64)
    Image.fromarray(arr).save(tmp_path / "a.png")
    seeded = ImageFolderDataset(str(tmp_path), size=16, random_crop=True, min_crop_f=0.3, max_crop_f=0.6, seed=4)
    assert np.array_equal(seeded[0]["image"], seeded[0]["image"])
    fresh = ImageFolderDataset(str(tmp_path), size=16, random_crop=True, min_crop_f=0.3, max_crop_f=0.6)
    assert not np.array_equal(fresh[0]["image"], fresh[0]["image"])
    full = ImageFolderDataset(str(tmp_path), size=64, flip_p=1.0)[0]["image"]
    assert np.allclose((full[:, ::-1] + 1) * 127.5, arr, atol=1e-3)


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"))
