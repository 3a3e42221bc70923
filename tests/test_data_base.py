"""Robust loading (modes, EXIF, corrupt/truncated/tiny files), square crops, and the skip-and-count dataset.

The helpers at the top are shared by the other tests/test_data_*.py files (they write small trees)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from ldm.data.base import (ImagePaths, Interpolation, SquareCrop, UnusableImage, item_rng, list_images,
                           open_image, to_model_image)

BAD_KINDS = ("corrupt", "truncated", "tiny", "empty")


def natural(name: str = "astronaut", side: int | None = None) -> np.ndarray:
    """A natural photo from scikit-image as uint8 [H, W, 3], optionally resized to side x side."""
    arr = getattr(skdata, name)()
    if side is not None:
        arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.Resampling.BICUBIC))
    return arr


def write_image(path: Path, kind: str = "rgb", arr: np.ndarray | None = None) -> Path:
    """Writes one test image of the given kind (a mode, or a broken file) and returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = natural("chelsea") if arr is None else arr
    image = Image.fromarray(arr)
    if kind == "rgb":
        image.save(path)
    elif kind == "gray":
        image.convert("L").save(path)
    elif kind == "cmyk":
        image.convert("CMYK").save(path.with_suffix(".jpg") if path.suffix != ".jpg" else path)
    elif kind == "rgba":
        image.convert("RGBA").save(path.with_suffix(".png"))
    elif kind == "palette":
        image.quantize(256).save(path.with_suffix(".png"))
    elif kind == "corrupt":
        path.write_bytes(b"this is not an image" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = path.with_suffix(".full.jpg")
        image.save(buf, format="JPEG")
        path.write_bytes(buf.read_bytes()[:2000])
        buf.unlink()
    elif kind == "tiny":
        image.resize((2, 2)).save(path)
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize("kind", ["rgb", "gray", "cmyk", "palette"])
def test_every_mode_becomes_rgb_of_the_same_size(tmp_path, kind):
    src = natural("chelsea")
    path = write_image(tmp_path / "a.png" if kind != "cmyk" else tmp_path / "a.jpg", kind, src)
    path = path if path.exists() else path.with_suffix(".png")
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (src.shape[1], src.shape[0])
    arr = np.asarray(image).astype(float)
    if kind == "gray":
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    else:  # colours survive the conversion (palette and JPEG are lossy)
        assert np.abs(arr - src).mean() < 12


def test_transparency_is_composited_on_white_and_16_bit_is_scaled(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[:, :15] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba).save(tmp_path / "t.png")
    arr = np.asarray(open_image(tmp_path / "t.png"))
    assert (arr[:, :15] == (255, 0, 0)).all() and (arr[:, 15:] == 255).all()
    assert (np.asarray(open_image(tmp_path / "t.png", background=(0, 0, 0)))[:, 15:] == 0).all()
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = np.asarray(open_image(tmp_path / "deep.png"))
    assert deep[0, 0, 0] == 0 and deep[-1, -1, 0] == 255
    assert np.abs(deep[..., 0].astype(float) - ramp / 257.0).max() <= 0.5 + 1e-6


def test_exif_orientation_is_applied(tmp_path):
    src = natural("chelsea")  # 300 x 451 (H x W)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(src).save(tmp_path / "r.jpg", exif=exif, quality=95)
    image = open_image(tmp_path / "r.jpg")
    assert image.size == (300, 451)
    expected = np.rot90(src, k=-1)
    assert np.abs(np.asarray(image).astype(float) - expected).mean() < 6


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_an_error_naming_them(tmp_path, kind):
    path = write_image(tmp_path / f"bad_{kind}.jpg", kind)
    with pytest.raises(UnusableImage, match=f"bad_{kind}"):
        open_image(path, min_image_size=8)


def test_npy_arrays_in_the_celebahq_layout_load(tmp_path):
    src = natural("astronaut", side=64)
    np.save(tmp_path / "x.npy", src.transpose(2, 0, 1)[None])
    assert np.array_equal(np.asarray(open_image(tmp_path / "x.npy")), src)


def test_model_range_round_trips_uint8():
    src = natural("coffee")
    out = to_model_image(src)
    assert out.dtype == np.float32 and out.min() >= -1.0 and out.max() <= 1.0
    assert np.array_equal(np.round((out + 1.0) * 127.5).astype(np.uint8), src)


def test_centre_crop_is_the_short_side_square_resized():
    src = Image.fromarray(natural("coffee"))  # 600 x 400
    out = SquareCrop(size=100)(src, np.random.default_rng(0))
    expected = src.crop((100, 0, 500, 400)).resize((100, 100), Image.Resampling.BICUBIC, reducing_gap=None)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_random_crop_scale_range_position_and_flip_statistics():
    t = SquareCrop(size=32, random_crop=True, min_crop_f=0.5, max_crop_f=0.8, flip_p=0.5)
    rng = np.random.default_rng(0)
    boxes = [t.sample(600, 400, rng) for _ in range(400)]
    sides = np.array([p.box[2] - p.box[0] for p in boxes])
    assert sides.min() >= 200 and sides.max() <= 320 and sides.std() > 20
    assert all(p.box[2] - p.box[0] == p.box[3] - p.box[1] and p.box[0] >= 0 and p.box[2] <= 600
               and p.box[3] <= 400 for p in boxes)
    lefts = np.array([p.box[0] for p in boxes])
    assert lefts.min() < 30 and lefts.max() > 250  # positions cover the image
    assert 0.4 < np.mean([p.flip for p in boxes]) < 0.6
    again = [t.sample(600, 400, np.random.default_rng(0)) for _ in range(1)]
    assert again[0] == boxes[0]
    src = Image.fromarray(natural("coffee"))
    mirrored = SquareCrop(size=50, flip_p=1.0)(src, rng)
    assert np.array_equal(np.asarray(mirrored), np.asarray(SquareCrop(size=50)(src, rng))[:, ::-1])


def test_item_rng_is_fixed_by_seed_and_index_and_fresh_without_seed():
    assert item_rng(3, 7).random() == item_rng(3, 7).random() != item_rng(3, 8).random()
    assert item_rng(None, 7).random() != item_rng(None, 7).random()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="interpolation"):
        Interpolation.parse("cubic-ish")
    with pytest.raises(ValueError, match="min_crop_f"):
        SquareCrop(size=8, min_crop_f=0.9, max_crop_f=0.5)


def test_image_paths_skip_and_count_bad_files_and_return_the_next_good_one(tmp_path):
    kinds = ["rgb", "corrupt", "gray", "truncated", "tiny", "rgb"]
    paths = [write_image(tmp_path / f"{i}_{k}.jpg", k) for i, k in enumerate(kinds)]
    ds = ImagePaths(paths, size=16, labels={"n": list(range(len(paths)))})
    assert [p.name for p in list_images(tmp_path)] == sorted(p.name for p in paths)
    got = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1 + 2 + 1  # index 1 once; indices 3, 4 from 3 and 4 from 4
    assert [g["n"] for g in got] == [0, 2, 2, 5, 5, 5]
    for g in got:
        assert g["image"].shape == (16, 16, 3) and g["image"].dtype == np.float32
        assert -1.0 <= g["image"].min() and g["image"].max() <= 1.0
        assert g["file_path_"] == str(paths[g["n"]])


def test_all_bad_files_give_a_clear_error(tmp_path):
    paths = [write_image(tmp_path / f"{i}.jpg", "corrupt") for i in range(3)]
    with pytest.raises(RuntimeError, match="unusable"):
        ImagePaths(paths, size=8)[0]
