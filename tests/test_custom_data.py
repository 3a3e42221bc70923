"""docs/custom-data.md and configs/custom/: the worked example runs as written on a folder of captioned photos
(both stages through main.py, then scripts/txt2img.py), the class-folder variant trains and samples, and the
full-size configs fit together."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata

from ldm.checkpoint import load_checkpoint
from ldm.cli import merge_configs
from ldm.runs import resolve_run_folder
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
CUSTOM = REPO / "configs" / "custom"
DOC = REPO / "docs" / "custom-data.md"
PHOTOS = {"astronaut": "an astronaut in a white suit", "chelsea": "a tabby cat",
          "coffee": "a cup of coffee on a saucer", "rocket": "a rocket on a launch pad"}
FIRST_STAGE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def documented_block() -> str:
    """The bash block of docs/custom-data.md that the comment naming this test file introduces."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"<!-- {Path(__file__).relative_to(REPO).as_posix()} runs this block")
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, start)
    assert match is not None, "no bash block after the marker"
    return match.group(1)


def write_photos(folder: Path, captions: bool = True) -> None:
    """scikit-image's sample photos (different sizes and shapes) as PNGs, each with its caption file."""
    folder.mkdir(parents=True)
    for name, caption in PHOTOS.items():
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
        if captions:
            (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")


def first_stage_weights(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(FIRST_STAGE_PREFIXES)}


@pytest.fixture(scope="module")
def worked_example(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Runs the documented block in a fresh folder that holds data/my_images and links to the repository."""
    work = tmp_path_factory.mktemp("custom-data")
    for name in ("configs", "scripts", "main.py"):
        (work / name).symlink_to(REPO / name)
    write_photos(work / "data" / "my_images")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_block()], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return work, proc


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_worked_example_trains_both_stages_and_samples(worked_example, monkeypatch):
    work, proc = worked_example
    assert "4 images; first caption: 'an astronaut in a white suit'" in proc.stdout
    (ae_run,) = work.glob("logs/*_my-ae-tiny")
    ae_ckpt = load_checkpoint(ae_run / "checkpoints" / "last.ckpt")
    run = resolve_run_folder(next(work.glob("logs/*_my-ldm-tiny")))
    ldm_ckpt = load_checkpoint(run.checkpoint)
    assert ae_ckpt["global_step"] == 8 and ldm_ckpt["global_step"] == 4  # 4 batches each (stage one: 2 optimisers)

    # stage two encodes with stage one's trained weights, unchanged
    ae_weights = first_stage_weights(ae_ckpt["state_dict"])
    ldm_weights = first_stage_weights(ldm_ckpt["state_dict"], "first_stage_model.")
    assert ae_weights and ae_weights.keys() == ldm_weights.keys()
    for key, value in ae_weights.items():
        torch.testing.assert_close(ldm_weights[key], value, rtol=0, atol=0, msg=key)

    # the saved config points at stage one and reads every image with its caption file
    config = OmegaConf.load(run.config)
    assert config.model.params.first_stage_config.params.ckpt_path == str(ae_run / "checkpoints" / "last.ckpt")
    monkeypatch.chdir(work)  # the config names data/my_images relative to where main.py ran
    dataset = instantiate_from_config(config.data.params.train)
    items = [dataset[i] for i in range(len(dataset))]
    assert {Path(it["relpath"]).stem: it["caption"] for it in items} == PHOTOS
    assert all(it["image"].shape == (32, 32, 3) for it in items)
    assert len(instantiate_from_config(config.data.params.validation)) == len(PHOTOS)

    # txt2img wrote 4 samples of the asked size, each a real image (not constant), from different noise
    files = sorted((work / "outputs" / "my-samples-tiny" / "samples").glob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float64)
    assert images.shape == (4, 32, 32, 3)
    assert images.reshape(4, -1).std(axis=1).min() > 2.0
    assert np.abs(images[0] - images[1]).mean() > 1.0
    assert list((work / "outputs" / "my-samples-tiny").glob("grid-*.png"))


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_class_folders_variant_trains_on_stage_one_and_samples_each_class(worked_example, tmp_path, monkeypatch):
    from ldm.train import main

    work, _ = worked_example
    (ae_run,) = work.glob("logs/*_my-ae-tiny")
    classes = tmp_path / "data" / "my_classes"
    for i, (name, _) in enumerate(PHOTOS.items()):  # two classes ("people", "things") of two photos each
        folder = classes / ("people" if i % 2 == 0 else "things")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    main(["--base", str(CUSTOM / "ldm-classes.yaml"), str(CUSTOM / "ldm-tiny.yaml"), "-t", "-n", "classes",
          "data.params.train.params.root=data/my_classes", "model.params.cond_stage_config.params.n_classes=3",
          f"model.params.first_stage_config.params.ckpt_path={ae_run / 'checkpoints' / 'last.ckpt'}",
          "lightning.trainer.enable_progress_bar=false"])
    run = resolve_run_folder(next(tmp_path.glob("logs/*_classes")))
    config = OmegaConf.load(run.config)
    dataset = instantiate_from_config(config.data.params.train)
    assert dataset.classes == ["people", "things"]
    assert sorted((it["human_label"], it["class_label"]) for it in (dataset[i] for i in range(4))) == [
        ("people", 0), ("people", 0), ("things", 1), ("things", 1)]
    state = load_checkpoint(run.checkpoint)["state_dict"]
    assert state["cond_stage_model.embedding.weight"].shape == (3, 512)  # 2 classes + the null class

    outdir = tmp_path / "samples"
    _script_main("sample_diffusion")(["--config", str(run.config), "--ckpt", str(run.checkpoint), "--classes", "0",
                                      "1", "--n_samples", "2", "--ddim_steps", "5", "--scale", "3", "--npz",
                                      "--outdir", str(outdir), "--device", "cpu"])
    saved = np.load(outdir / "samples.npz")
    assert saved["arr_0"].shape == (4, 32, 32, 3) and saved["arr_1"].tolist() == [0, 0, 1, 1]
    assert saved["arr_0"].reshape(4, -1).std(axis=1).min() > 2.0


@pytest.mark.parametrize("tiny", [pytest.param(False, marks=pytest.mark.slow), True], ids=["full", "tiny"])
def test_the_stages_fit_together(tiny):
    """Stage two's first stage is stage one's network; the UNet works on its latents with each conditioning."""
    suffix = ["autoencoder-tiny.yaml"] if tiny else []
    ae_config = merge_configs([CUSTOM / "autoencoder.yaml", *(CUSTOM / s for s in suffix)],
                              ["model.params.lossconfig.params.perceptual_weight=0"])  # no VGG weights here
    ae = instantiate_from_config(ae_config.model)
    size = ae_config.data.params.train.params.size
    torch.manual_seed(0)
    with torch.no_grad():
        latent = ae.encode(torch.rand(2, 3, size, size) * 2 - 1).mode()
    for stage_two, prompts in (("ldm.yaml", ["a cat", "a dog"]), ("ldm-classes.yaml", {"class_label": [0, 1]})):
        config = merge_configs([CUSTOM / stage_two, *([CUSTOM / "ldm-tiny.yaml"] if tiny else [])])
        first = config.model.params.first_stage_config.params
        assert first.embed_dim == ae_config.model.params.embed_dim and first.ddconfig == ae_config.model.params.ddconfig
        assert config.data.params.train.params.size == size
        model = instantiate_from_config(config.model)
        assert latent.shape[1:] == (model.channels, model.image_size, model.image_size)
        with torch.no_grad():
            context = model.get_learned_conditioning(prompts)
            out = model.model.diffusion_model(latent, torch.tensor([10, 500]), context=context)
        assert out.shape == latent.shape and torch.isfinite(out).all()
