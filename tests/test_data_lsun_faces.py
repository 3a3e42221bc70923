"""LSUN and CelebA-HQ/FFHQ: original file-list layouts under data/, plain folders, reference configs."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.base import in_validation_split
from ldm.data.faceshq import CelebAHQTrain, FacesHQTrain, FacesHQValidation, FFHQTrain, FFHQValidation
from ldm.data.lsun import LSUNBedroomsTrain, LSUNBedroomsValidation, LSUNChurchesTrain, LSUNChurchesValidation
from ldm.util import instantiate_from_config
from tests.test_data_base import natural, write_image
from tests.helpers.paths import REFERENCE_CONFIGS

REF = REFERENCE_CONFIGS / "latent-diffusion"


def photos(folder: Path, n: int, ext=".jpg", shape=(48, 64)) -> list[str]:
    names = []
    for i in range(n):
        arr = np.asarray(Image.fromarray(natural(("astronaut", "chelsea", "coffee")[i % 3])).resize(shape[::-1]))
        write_image(folder / f"img_{i:03d}{ext}", "rgb", arr)
        names.append(f"img_{i:03d}{ext}")
    return names


def test_lsun_reads_the_original_file_lists_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = photos(tmp_path / "data/lsun/churches", 4)
    write_image(tmp_path / "data/lsun/churches/broken.jpg", "corrupt")
    Path("data/lsun/church_outdoor_train.txt").write_text("\n".join(names[:2] + ["broken.jpg", names[2]]) + "\n")
    Path("data/lsun/church_outdoor_val.txt").write_text(names[3] + "\n")
    train, val = LSUNChurchesTrain(size=32), LSUNChurchesValidation(size=32)
    assert len(train) == 4 and len(val) == 1
    assert train.transform.flip_p == 0.5 and val.transform.flip_p == 0.0
    items = [train[i] for i in range(4)]
    assert train.skipped == 1 and items[2]["relative_file_path_"] == names[2]
    # score-sde preprocessing: centre crop of the short side, then resize
    src = Image.open(tmp_path / "data/lsun/churches" / names[3]).convert("RGB")
    expected = np.asarray(src.crop((8, 0, 56, 48)).resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=None))
    assert np.allclose((val[0]["image"] + 1) * 127.5, expected, atol=1e-3)
    flipped = LSUNChurchesValidation(size=32, flip_p=1.0)[0]["image"]
    assert np.array_equal(flipped, val[0]["image"][:, ::-1])
    cfg = OmegaConf.load(REF / "models/ldm/lsun_churches256/config.yaml").data.params
    assert instantiate_from_config(cfg.validation)[0]["image"].shape == (256, 256, 3)


def test_lsun_plain_folder_is_split_stably_and_flips_half_the_time(tmp_path):
    names = photos(tmp_path / "beds", 30, shape=(24, 32))
    train = LSUNBedroomsTrain(data_root=str(tmp_path / "beds"), size=16, val_fraction=0.3)
    val = LSUNBedroomsValidation(data_root=str(tmp_path / "beds"), size=16, val_fraction=0.3)
    assert sorted(train.relpaths + val.relpaths) == names and not set(train.relpaths) & set(val.relpaths)
    assert all(in_validation_split(r, 0.3) for r in val.relpaths) and 3 <= len(val) <= 18
    seeded = LSUNBedroomsTrain(data_root=str(tmp_path / "beds"), size=16, val_fraction=0.3, seed=1)
    plain = LSUNBedroomsTrain(data_root=str(tmp_path / "beds"), size=16, val_fraction=0.3, flip_p=0.0)
    flips = [not np.array_equal(seeded[i]["image"], plain[i]["image"]) for i in range(len(train))]
    assert 0.15 < np.mean(flips) < 0.85


def test_lsun_missing_data_names_list_and_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        LSUNChurchesTrain(size=32)
    assert "data/lsun/church_outdoor_train.txt" in str(err.value) and "data/lsun/churches" in str(err.value)


def test_faces_file_lists_npy_keys_and_reference_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    celeb = tmp_path / "data/celebahq"
    celeb.mkdir(parents=True)
    for i in range(3):  # taming's layout: uint8 arrays [1, 3, H, W]
        np.save(celeb / f"{i}.npy", natural("astronaut", side=40).transpose(2, 0, 1)[None])
    Path("data/celebahqtrain.txt").write_text("0.npy\n1.npy\n")
    Path("data/celebahqvalidation.txt").write_text("2.npy\n")
    names = photos(tmp_path / "data/ffhq", 3, ext=".png", shape=(40, 40))
    Path("data/ffhqtrain.txt").write_text("\n".join(names[:2]))
    Path("data/ffhqvalidation.txt").write_text(names[2])
    ds = CelebAHQTrain(size=32)
    assert len(ds) == 2 and ds[0]["image"].shape == (32, 32, 3) and ds[0]["file_path_"].endswith("0.npy")
    assert set(FFHQTrain(size=16, keys=["image"])[1]) == {"image"}
    for name in ("celebahq-ldm-vq-4", "ffhq-ldm-vq-4"):  # these name taming.data.faceshq.* targets
        cfg = OmegaConf.load(REF / f"configs/latent-diffusion/{name}.yaml").data.params
        assert instantiate_from_config(cfg.train)[0]["image"].shape == (256, 256, 3)
    for name in ("celeba256", "ffhq256"):
        cfg = OmegaConf.load(REF / f"models/ldm/{name}/config.yaml").data.params
        assert len(instantiate_from_config(cfg.validation)) == 1
    both = FacesHQTrain(size=32, crop_size=16, coord=True, seed=0)
    assert len(both) == 4 and [both[i]["class"] for i in range(4)] == [0, 0, 1, 1]
    item = both[3]
    assert item["image"].shape == (16, 16, 3) and item["coord"].shape == (16, 16, 1)
    # coord holds the crop's flat position in the 32 x 32 image
    top, left = divmod(int(round(item["coord"][0, 0, 0] * 32 * 32)), 32)
    full = FFHQTrain(size=32)[1]["image"]
    assert np.array_equal(item["image"], full[top:top + 16, left:left + 16])
    centre = FacesHQValidation(size=32, crop_size=16)[1]
    assert np.array_equal(centre["image"], FFHQValidation(size=32)[0]["image"][8:24, 8:24])


def test_faces_plain_folder_and_missing_root(tmp_path):
    photos(tmp_path / "ffhq", 12, ext=".png", shape=(20, 20))
    train = FFHQTrain(size=16, root=str(tmp_path / "ffhq"), file_list=str(tmp_path / "none.txt"), val_fraction=0.25)
    val = FFHQValidation(size=16, root=str(tmp_path / "ffhq"), file_list=str(tmp_path / "none.txt"),
                         val_fraction=0.25)
    assert len(train) + len(val) == 12
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FFHQTrain(size=16, root=str(tmp_path / "nowhere"))
    for i in range(12):  # a plain folder of CelebA-HQ arrays
        np.save(tmp_path / "ffhq" / f"{i}.npy", natural("chelsea", side=20).transpose(2, 0, 1)[None])
    both = CelebAHQTrain(size=16, root=str(tmp_path / "ffhq"), file_list=str(tmp_path / "none.txt"),
                         val_fraction=0.25)
    every = sorted(p.name for p in (tmp_path / "ffhq").iterdir())
    assert both.relpaths == [r for r in every if not in_validation_split(r, 0.25)]
    assert {Path(r).suffix for r in both.relpaths} == {".png", ".npy"}
    images_only = LSUNBedroomsTrain(data_root=str(tmp_path / "ffhq"), size=16, val_fraction=0.25)
    assert images_only.relpaths == [r for r in both.relpaths if r.endswith(".png")]  # other listings skip arrays
