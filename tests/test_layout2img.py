"""Layout-to-image wiring: the null layout of guidance and dropout, layouts drawn in log_images, and
scripts/layout2img.py with its errors on bad layout files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.data.layout_draw import class_colour
from ldm.util import instantiate_from_config

CONFIG = Path(__file__).parent / "configs" / "layout2img-tiny.yaml"
NAMES = ["grinning face", "face with tears of joy", "smiling face with heart-shaped eyes",
         "smiling face with sunglasses"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.load(CONFIG).model).eval()


def tokens_of(model, boxes, classes):
    return model.layout_tokenizer.encode(torch.tensor(boxes), torch.tensor(classes))


def test_the_null_layout_comes_from_the_tokenizer_for_guidance_and_dropout(model):
    tokenizer = model.layout_tokenizer
    null = tokenizer.null(3)
    assert tokenizer.decode(null[0]).boxes.shape == (0, 4)  # no objects, the whole image
    assert torch.equal(model.conditions.null(3), null)
    with torch.no_grad():
        torch.testing.assert_close(model.get_unconditional_conditioning(3), model.get_learned_conditioning(null))
    layout = tokens_of(model, [[0.1, 0.1, 0.5, 0.5]], [2]).expand(64, -1)
    dropped = model.conditions.drop(layout)
    is_null = (dropped == null[:1]).all(dim=1)
    assert ((dropped == layout[:1]).all(dim=1) | is_null).all()  # every row is kept or becomes the empty layout
    assert 0 < int(is_null.sum()) < 64  # ucg_rate 0.1 of the config


def test_a_zoo_style_config_without_layout_tokenizer_reads_it_from_the_conditioner():
    cfg = OmegaConf.load(CONFIG).model
    del cfg.params.layout_tokenizer
    model = instantiate_from_config(cfg)
    assert model.layout_tokenizer.seq_len == 11 and model.layout_tokenizer.vocab_size == 8192
    assert model.layout_class_names is None
    assert torch.equal(model.conditions.null(1), instantiate_from_config(
        OmegaConf.load(CONFIG).model).layout_tokenizer.null(1))
    cfg.params.layout_tokenizer = {"num_classes": 4, "max_objects": 3, "class_names": NAMES[:3]}
    with pytest.raises(ValueError, match="layout_tokenizer.class_names has 3 names for num_classes=4"):
        instantiate_from_config(cfg)


def test_log_images_draws_the_layouts_beside_and_over_the_samples(model):
    tokens = torch.stack([tokens_of(model, [[0.25, 0.25, 0.75, 0.75]], [1]),
                          tokens_of(model, [[0.0, 0.5, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]], [0, 3])])
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "coordinates_bbox": tokens}
    torch.manual_seed(0)
    log = model.log_images(batch, N=2, ddim_steps=2, inpaint=False, plot_progressive_rows=False,
                           plot_diffusion_rows=False, quantize_denoised=False)
    drawn, over, samples = log["conditioning"], log["samples_layout"], log["samples"]
    assert drawn.shape == over.shape == samples.shape == (2, 3, 32, 32)

    def rgb(image, y, x):
        return tuple(((image[:, y, x] + 1) * 127.5).round().int().tolist())
    # the first layout's box outline (x from 7 to 23: 0.25 and 0.75 quantised) in its class colour, the canvas
    # white elsewhere
    assert rgb(drawn[0], 20, 7) == rgb(drawn[0], 20, 23) == class_colour(1)
    assert rgb(drawn[0], 2, 30) == rgb(drawn[0], 20, 15) == (255, 255, 255)
    assert rgb(drawn[1], 24, 0) == class_colour(0) and rgb(drawn[1], 12, 31) == class_colour(3)
    # drawn over the samples: the outline replaces the sample there, the inside of a box is the sample
    assert rgb(over[0], 20, 7) == class_colour(1)
    torch.testing.assert_close(over[0, :, 18:23, 8:23], samples[0, :, 18:23, 8:23].clamp(-1, 1),
                               atol=1 / 127.5, rtol=0)


def write_layout(path: Path, annotations: list[dict]) -> Path:
    path.write_text(json.dumps({"images": [{"id": 1}, {"id": 2}], "annotations": annotations}))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layout-model")
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    ckpt = tmp / "layout.ckpt"
    save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    return ckpt


def test_layout2img_samples_every_layout_and_names_bad_entries(checkpoint, tmp_path):
    from tests.test_scripts_sampling import load_script
    script = load_script("layout2img")
    good = write_layout(tmp_path / "good.json", [
        {"image_id": 1, "category": "grinning face", "bbox": [0.1, 0.1, 0.4, 0.4]},
        {"image_id": 2, "category": "smiling face with sunglasses", "bbox": [0.5, 0.5, 0.4, 0.4]}])
    out = tmp_path / "out"
    args = ["--config", str(CONFIG), "--ckpt", str(checkpoint), "--steps", "2", "--n_samples", "2", "--scale", "2"]
    script.main([*args, "--layout", str(good), "--outdir", str(out)])
    samples = sorted((out / "samples").glob("*.png"))
    overlays = sorted((out / "layouts" / "samples").glob("*.png"))
    assert len(samples) == len(overlays) == 2
    overlay = np.asarray(Image.open(overlays[1]))
    assert class_colour(3) in [tuple(p) for p in overlay[24, 14:18]]  # the second layout's box (x from about 16)
    assert np.asarray(Image.open(samples[0])).shape == (32, 32, 3)

    outside = write_layout(tmp_path / "outside.json", [
        {"image_id": 1, "category": "grinning face", "bbox": [0.1, 0.1, 0.4, 0.4]},
        {"image_id": 2, "category": "grinning face", "bbox": [0.8, 0.5, 0.4, 0.4]}])
    with pytest.raises(ValueError, match=r"outside.json: annotations\[1\]: bbox .* is outside \[0, 1\]"):
        script.main([*args, "--layout", str(outside)])
    unknown = write_layout(tmp_path / "unknown.json", [{"image_id": 1, "category": "cat", "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"unknown.json: annotations\[0\] has the unknown class name 'cat'"):
        script.main([*args, "--layout", str(unknown)])


def test_layout2img_measures_how_well_samples_follow_the_layouts_of_a_coco_file(checkpoint, tmp_path):
    from ldm.data.emoji_layout import make_emoji_layout_set, own_and_other_agreement
    from ldm.data.layout import LayoutTokenizer
    from tests.test_scripts_sampling import load_script
    script = load_script("layout2img")
    annotations = make_emoji_layout_set(tmp_path / "val", num_images=4, size=32, objects=(1, 1), seed=1)
    out = tmp_path / "out"
    script.main(["--config", str(CONFIG), "--ckpt", str(checkpoint), "--steps", "2", "--n_samples", "3",
                 "--layout", str(annotations), "--pixel_boxes", "--max_layouts", "3", "--agreement", "--seed", "4",
                 "--outdir", str(out)])
    result = json.loads((out / "agreement.json").read_text())
    samples = sorted((out / "samples").glob("*.png"))
    assert result["samples"] == len(samples) == 3
    # the numbers are those of the saved samples against the file's first 3 boxes (pixels -> fractions of 32)
    boxes = [a["bbox"] for a in json.loads(annotations.read_text())["annotations"][:3]]
    tokenizer = LayoutTokenizer(4, vocab_size=8192, max_objects=3, use_group_flag=False)
    layouts = [tokenizer.decode(tokenizer.encode(torch.tensor([[x / 32, y / 32, (x + w) / 32, (y + h) / 32]]),
                                                 [0])) for x, y, w, h in boxes]
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in samples])
    own, other = own_and_other_agreement(images.float() / 127.5 - 1, layouts, seed=4)
    assert (result["own_iou"], result["other_iou"]) == pytest.approx((own, other))
    # the overlay grid: samples enlarged 4x to 128 pixels (3 tiles in a row, 2 pixels apart), each with its box
    (grid,) = (out / "layouts").glob("grid-*.png")
    grid = np.array(Image.open(grid))
    assert grid.shape == (2 + 130, 2 + 3 * 130, 3)
    first = json.loads(annotations.read_text())["annotations"][0]
    x0, y0, x1, y1 = layouts[0].boxes[0].tolist()
    assert tuple(grid[2 + int((y0 + y1) / 2 * 128), 2 + int(x0 * 128)]) == class_colour(first["category_id"])
    enlarged = images[0].repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    same = (torch.from_numpy(grid[2:130, 2:130]).permute(2, 0, 1) == enlarged).all(dim=0).float().mean()
    assert 0.7 < same < 1.0  # the enlarged sample, but for the box and its label


def test_the_emoji_layout_config_builds_with_a_tokenizer_matching_its_data(tmp_path):
    """configs/layout/layout2img-emoji-tiny.yaml: the model's layout tokenizer reads the tokens its data set makes
    (same vocabulary, sequence length and classes), and the conditioner takes sequences of that length."""
    from ldm.data.emoji_layout import make_emoji_layout_set
    cfg = OmegaConf.load(Path(__file__).parent.parent / "configs" / "layout" / "layout2img-emoji-tiny.yaml")
    annotations = make_emoji_layout_set(tmp_path / "set", num_images=4, size=32, objects=(1, 1), seed=0)
    params = cfg.data.params.train.params
    params.annotation_file, params.image_root = str(annotations), str(annotations.parent)
    data = instantiate_from_config(cfg.data.params.train)
    model = instantiate_from_config(cfg.model)
    tokenizer = model.layout_tokenizer
    assert (tokenizer.vocab_size, tokenizer.seq_len, tokenizer.num_classes) == (
        data.tokenizer.vocab_size, data.tokenizer.seq_len, data.tokenizer.num_classes)
    assert model.layout_class_names == data.class_names
    item = data[0]
    layout = tokenizer.decode(item["coordinates_bbox"])
    assert len(layout) == 1 and tokenizer.step == 1 / 16
    with torch.no_grad():
        c = model.get_learned_conditioning(item["coordinates_bbox"][None])
    assert c.shape == (1, tokenizer.seq_len, 32)
