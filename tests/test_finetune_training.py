"""Fine-tuning through main.py and Lightning: a warm start with its report, frozen parameters that stay
bit-identical, per-group learning rates, post-hoc EMA snapshots that reconstruct a directly tracked profile, and
LoRA adapters written as their own file that, merged into the base model, give the trained model's outputs."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from ldm.checkpoint import load_checkpoint, read_safetensors, save_safetensors
from ldm.finetune.lora import LoraMismatchError, load_lora, load_lora_for_sampling
from ldm.finetune.params import matches
from ldm.inference import load_config, load_model
from ldm.modules.power_ema import PowerFunctionEMA
from ldm.posthoc_ema import PostHocEMAError, list_snapshots, plan, reconstruct
from ldm.util import instantiate_from_config

CONFIG = Path(__file__).parent / "configs" / "ldm-stage2.yaml"
FROZEN = ["model.diffusion_model.input_blocks", "*.norm*"]


class DirectProfile(pl.Callback):
    """Tracks one power-function EMA profile of the network directly and saves it at the end of training."""

    def __init__(self, sigma_rel: float, path: str) -> None:
        self.sigma_rel, self.path, self.ema = sigma_rel, path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is None:
            self.ema = PowerFunctionEMA(pl_module.model, (self.sigma_rel,))
        self.ema(pl_module.model)

    def on_train_end(self, trainer, pl_module) -> None:
        save_safetensors(self.ema.profile_weights(0), self.path)


def start_checkpoint(tmp_path: Path, conditioner: bool = True) -> Path:
    """The model of CONFIG with perturbed random weights (so that the zero-initialised output layer does not hide
    anything), saved with or without its conditioner (which a warm start then leaves new)."""
    torch.manual_seed(0)
    model = instantiate_from_config(load_config(CONFIG).model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.model_ema.reset(model.model)
    path = tmp_path / "start.safetensors"
    save_safetensors({k: v for k, v in model.state_dict().items()
                      if conditioner or not k.startswith("cond_stage_model.")}, path)
    return path


def train(tmp_path: Path, overlay: dict, name: str) -> Path:
    from ldm.train import main

    overlay_path = tmp_path / f"{name}.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))
    assert main(["--base", str(CONFIG), str(overlay_path), "-t", "-l", str(tmp_path / name), "-s", "3",
                 "lightning.callbacks.image_logger.params.batch_frequency=1000"]) in (0, None)
    (run,) = [d for d in (tmp_path / name).iterdir() if d.is_dir()]
    return run


@pytest.mark.slow
def test_frozen_parameters_groups_warm_start_and_posthoc_ema_through_main(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ldm.finetune.warm_start")
    start = start_checkpoint(tmp_path, conditioner=False)
    run = train(tmp_path, {
        "model": {"params": {
            "warm_start": {"path": str(start)},
            "finetune": {"freeze": FROZEN, "param_groups": [{"name": "attn", "params": ["*.attn2.*"],
                                                             "lr_scale": 10.0}]},
            "posthoc_ema": {"sigma_rels": [0.05, 0.10], "snapshot_every": 1}}},
        "lightning": {"trainer": {"max_steps": 8, "val_check_interval": 8},
                      "callbacks": {"direct": {"target": "tests.test_finetune_training.DirectProfile",
                                               "params": {"sigma_rel": 0.075, "path": str(tmp_path / "d.st")}}}},
    }, "finetune")
    assert "warm start from" in caplog.text and "left new" in caplog.text and "cond_stage_model" in caplog.text
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    sd, (start_sd, _) = ckpt["state_dict"], read_safetensors(start)
    frozen = [k for k in start_sd if k.startswith("model.") and any(matches(k, p) for p in FROZEN)]
    trained = [k for k in start_sd if k.startswith("model.") and k not in frozen]
    assert len(frozen) > 10
    for k in frozen:
        assert torch.equal(sd[k], start_sd[k]), k  # bit-identical after 8 AdamW steps
    assert sum(not torch.equal(sd[k], start_sd[k]) for k in trained) > len(trained) // 2
    # the EMA tracks only what trains; the optimiser has the configured groups
    assert not any(k.startswith("model_ema.diffusion_modelinput_blocks") for k in sd)
    groups = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert set(groups) == {"attn", "default"} and groups["attn"] == pytest.approx(10 * groups["default"])

    # post-hoc EMA: the reconstruction of a length tracked directly during the same run matches it
    snapshots = list_snapshots(run / "posthoc_ema")
    assert len(snapshots) == 16 and max(s.t for s in snapshots) == 8
    direct, _ = read_safetensors(tmp_path / "d.st")
    rebuilt = reconstruct(snapshots, 0.075, progress=False)
    assert set(rebuilt) == set(direct)
    delta = torch.cat([(rebuilt[k] - direct[k]).flatten() for k in direct])
    moved = torch.cat([(direct[k] - start_sd["model." + k]).flatten() for k in direct])
    assert delta.norm() < 0.05 * moved.norm()  # within 5% of how far training moved the weights
    with pytest.raises(PostHocEMAError, match="sigma_rel=0.28 is outside the reconstructable range"):
        plan(snapshots, 0.28)


@pytest.mark.slow
def test_lora_adapters_saved_by_training_merge_into_the_base_model(tmp_path):
    start = start_checkpoint(tmp_path)
    run = train(tmp_path, {"model": {"base_learning_rate": 0.01, "params": {
        "warm_start": {"path": str(start)}, "lora": {"rank": 4, "alpha": 8}}},
        "lightning": {"trainer": {"max_steps": 4, "val_check_interval": 4}}}, "lora")
    tensors, _ = read_safetensors(run / "lora.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    ckpt_sd = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    ema_keys = [k for k in ckpt_sd if k.startswith("model_ema.") and k not in ("model_ema.decay",
                                                                                "model_ema.num_updates")]
    assert ema_keys and all("lora" in k for k in ema_keys)  # the EMA was created after the adapters

    project = next((run / "configs").glob("*-project.yaml"))
    unmerged = load_model(project, run / "checkpoints" / "last.ckpt", device="cpu", strict=True)
    merged = load_model(CONFIG, start, device="cpu")
    merged.scale_factor = unmerged.scale_factor
    load_lora(merged, run / "lora.safetensors")
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1, 20, 45])
    cond = merged.get_learned_conditioning({"class_label": torch.tensor([0, 1, 2])})
    with torch.no_grad():
        expected = unmerged.apply_model(x, t, cond)
        got = merged.apply_model(x, t, cond)
        plain = load_model(CONFIG, start, device="cpu").apply_model(x, t, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the adapters changed the model

    # for sampling, the EMA weights get the same change
    sampler = load_lora_for_sampling(load_model(CONFIG, start, device="cpu"), run / "lora.safetensors")
    with torch.no_grad(), sampler.ema_scope():
        torch.testing.assert_close(sampler.apply_model(x, t, cond), got, rtol=1e-4, atol=1e-5)
    other = load_config(CONFIG)
    other.model.params.unet_config.params.context_dim = 32
    other.model.params.cond_stage_config.params.embed_dim = 32
    with pytest.raises(LoraMismatchError, match="lora.safetensors"):
        load_lora(instantiate_from_config(other.model), run / "lora.safetensors")
