"""ImageNet train/validation and SR pairs on small synset trees written by the tests."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.imagenet import (ImageNetSRTrain, ImageNetSRValidation, ImageNetTrain, ImageNetValidation,
                               index_to_human, index_to_synset, str_to_indices)
from ldm.util import ConfigError, instantiate_from_config
from tests.test_data_base import natural, write_image
from tests.helpers.paths import REFERENCE_CONFIGS

REF = REFERENCE_CONFIGS / "latent-diffusion"
SYN = index_to_synset()
CLASSES = (SYN[0], SYN[10], SYN[500])  # tench, brambling, cliff dwelling


def make_tree(data_dir: Path, per_class=3, corrupt=True, shape=(40, 56)) -> list[Path]:
    files = []
    photos = ["astronaut", "chelsea", "coffee"]
    for c, synset in enumerate(CLASSES):
        for i in range(per_class):
            arr = np.asarray(Image.fromarray(natural(photos[(c + i) % 3])).resize(shape[::-1]))
            files.append(write_image(data_dir / synset / f"{synset}_{i}.JPEG", "rgb", arr))
    if corrupt:
        files.append(write_image(data_dir / CLASSES[1] / f"{CLASSES[1]}_9.JPEG", "truncated"))
    return files


def test_train_layout_labels_names_and_skips(tmp_path):
    make_tree(tmp_path / "ILSVRC2012_train" / "data")
    ds = ImageNetTrain(config={"size": 32}, data_root=str(tmp_path))
    assert len(ds) == 10 and ds.transform.random_crop
    items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1  # the truncated file, replaced by the next item
    for it in items:
        assert it["image"].shape == (32, 32, 3) and it["image"].dtype == np.float32
        assert -1 <= it["image"].min() and it["image"].max() <= 1
        assert it["relpath"].startswith(it["synsets"] + "/")
        assert it["class_label"] == sorted(CLASSES).index(it["synsets"])
        assert it["human_label"] == index_to_human()[SYN.index(it["synsets"])]
    assert items[0]["human_label"] == "tench, Tinca tinca"
    orig = ImageNetTrain(config={"size": 32, "keep_orig_class_label": True}, data_root=str(tmp_path))
    assert sorted({orig[i]["class_label"] for i in range(0, 9, 3)}) == [0, 10, 500]


def test_validation_is_centre_cropped_and_deterministic(tmp_path, monkeypatch):
    make_tree(tmp_path / "autoencoders" / "data" / "ILSVRC2012_validation" / "data", corrupt=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the original default location
    ds = ImageNetValidation(config={"size": 24})
    assert not ds.transform.random_crop and len(ds) == 9
    assert np.array_equal(ds[4]["image"], ds[4]["image"])
    nested = ImageNetValidation(config={"size": 24, "ImageNetValidation": {"random_crop": True}})
    assert nested.transform.random_crop


def test_reference_config_data_sections_instantiate(tmp_path, monkeypatch):
    make_tree(tmp_path / "autoencoders" / "data" / "ILSVRC2012_train" / "data", corrupt=False)
    make_tree(tmp_path / "autoencoders" / "data" / "ILSVRC2012_validation" / "data", corrupt=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cin = OmegaConf.load(REF / "models/ldm/cin256/config.yaml").data.params
    for split in ("train", "validation"):
        ds = instantiate_from_config(cin[split])
        assert ds[0]["image"].shape == (256, 256, 3)
    ae = OmegaConf.load(REF / "configs/autoencoder/autoencoder_kl_32x32x4.yaml").data.params
    sr = instantiate_from_config(ae.train)
    # 40 x 56 images are smaller than 256: skipped by default; allow them here to check the pair
    assert sr.degradation.value == "pil_nearest" and sr.min_image_size == 256
    sr.min_image_size = 8
    item = sr[0]
    assert item["image"].shape == (256, 256, 3) and item["LR_image"].shape == (64, 64, 3)


def test_filelist_flat_validation_and_direct_synset_folder(tmp_path):
    root = tmp_path / "ILSVRC2012_train"
    make_tree(root / "data", corrupt=False)
    (root / "filelist.txt").write_text(f"{CLASSES[0]}/{CLASSES[0]}_0.JPEG\n{CLASSES[2]}/{CLASSES[2]}_1.JPEG\n")
    assert ImageNetTrain(config={"size": 16}, data_root=str(tmp_path)).relpaths == [
        f"{CLASSES[0]}/{CLASSES[0]}_0.JPEG", f"{CLASSES[2]}/{CLASSES[2]}_1.JPEG"]
    # a plain folder of synset folders
    make_tree(tmp_path / "plain", corrupt=False)
    assert len(ImageNetTrain(config={"size": 16}, data_root=str(tmp_path / "plain"))) == 9
    # flat validation images with validation_synset.txt
    flat = tmp_path / "val" / "ILSVRC2012_validation"
    for i, synset in enumerate(CLASSES):
        write_image(flat / "data" / f"ILSVRC2012_val_{i:08d}.JPEG", "rgb", natural(side=40))
    (flat / "validation_synset.txt").write_text(
        "".join(f"ILSVRC2012_val_{i:08d}.JPEG {s}\n" for i, s in enumerate(CLASSES)))
    val = ImageNetValidation(config={"size": 16}, data_root=str(tmp_path / "val"))
    assert [val[i]["synsets"] for i in range(3)] == sorted(CLASSES)
    assert val[0]["image"].shape == (16, 16, 3)


def test_sub_indices_and_bad_config(tmp_path):
    make_tree(tmp_path / "ILSVRC2012_train" / "data", corrupt=False)
    assert str_to_indices("0-3, 10,500-501") == [0, 1, 2, 10, 500]
    ds = ImageNetTrain(config={"size": 16, "sub_indices": "0-1,500"}, data_root=str(tmp_path))
    assert {ds[i]["synsets"] for i in range(len(ds))} == {CLASSES[0], CLASSES[2]}
    with pytest.raises(ConfigError, match="siz"):
        ImageNetTrain(config={"siz": 16}, data_root=str(tmp_path))


def test_missing_root_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_train/data/<synset>") as err:
        ImageNetTrain(config={"size": 16}, data_root=str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "never downloads" in str(err.value)


def test_super_resolution_pairs(tmp_path):
    make_tree(tmp_path / "ILSVRC2012_train" / "data", shape=(64, 80))
    make_tree(tmp_path / "ILSVRC2012_validation" / "data", shape=(64, 80), corrupt=False)
    train = ImageNetSRTrain(size=32, degradation="bsrgan_light", downscale_f=4, data_root=str(tmp_path), seed=0)
    items = [train[i] for i in range(len(train))]
    assert train.skipped == 1
    for it in items:
        assert it["image"].shape == (32, 32, 3) and it["LR_image"].shape == (8, 8, 3)
        assert it["LR_image"].dtype == np.float32 and -1 <= it["LR_image"].min() <= it["LR_image"].max() <= 1
    # the LR images are degraded versions of the HR crops: they follow their 4x box averages
    box = np.stack([it["image"].reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) for it in items])
    lr = np.stack([it["LR_image"] for it in items])
    assert np.corrcoef(box.ravel(), lr.ravel())[0, 1] > 0.7 and np.abs(box - lr).mean() < 0.25
    val = ImageNetSRValidation(size=32, degradation="bsrgan", data_root=str(tmp_path))
    a, b = val[2], val[2]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["LR_image"], b["LR_image"])
    small = ImageNetSRValidation(size=96, degradation="bicubic", data_root=str(tmp_path))
    with pytest.raises(RuntimeError, match="unusable"):  # every image is below min_image_size = size
        small[0]
    assert small.skipped > 0
    with pytest.raises(ValueError, match="downscale_f"):
        ImageNetSRTrain(size=30, degradation="bicubic", data_root=str(tmp_path))
