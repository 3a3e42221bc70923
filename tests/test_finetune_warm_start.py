"""Warm start from a checkpoint of another architecture: loaded, skipped, left new and unexpected, by key."""
from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointError, save_safetensors
from ldm.finetune.warm_start import WarmStartConfig, warm_start
from tests.helpers.finetune import TinyLDM, tiny_unet


def test_report_names_what_was_loaded_skipped_new_and_unexpected(tmp_path):
    source = TinyLDM(context_dim=16, seed=1)
    sd = source.state_dict()
    sd["first_stage_model.decoder.weight"] = torch.ones(2)  # a part the target does not have
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "source.ckpt")
    target = TinyLDM(context_dim=24, seed=2)  # cross-attention keys/values and the text stand-in change shape
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    report = warm_start(target, WarmStartConfig.from_config({"path": str(tmp_path / "source.ckpt")}))
    own = target.state_dict()
    mismatched = {k for k, _, _ in report.shape_mismatched}
    assert "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight" in mismatched
    assert ("cond_stage_model.weight", (16, 8), (24, 8)) in report.shape_mismatched
    assert report.unexpected == ["first_stage_model.decoder.weight"]
    assert set(report.loaded) | set(report.new) == set(own) and not set(report.loaded) & set(report.new)
    assert mismatched <= set(report.new)
    for key in report.loaded:
        assert torch.equal(own[key], sd[key]), key
    for key in report.new:
        assert torch.equal(own[key], initial[key]), key
    assert "skipped for their shape" in report.summary() and "1 unexpected" in report.summary()


def test_from_ema_ignore_and_rename(tmp_path):
    source = TinyLDM(seed=1)
    with torch.no_grad():
        for buf_name, buf in source.model_ema.named_buffers():
            if buf_name not in ("decay", "num_updates"):
                buf.fill_(0.5)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ema.ckpt")
    target = TinyLDM(seed=2)
    before = target.cond_stage_model.weight.detach().clone()
    report = warm_start(target, WarmStartConfig.from_config(
        {"path": str(tmp_path / "ema.ckpt"), "from_ema": True, "ignore": ["cond_stage_model."]}))
    assert all((p == 0.5).all() for p in target.model.parameters())
    assert torch.equal(target.cond_stage_model.weight, before)
    assert set(report.ignored) == {"cond_stage_model.weight", "cond_stage_model.bias"}
    # a bare UNet state dict in safetensors, put in place by a prefix rename
    unet = tiny_unet(seed=3)
    save_safetensors(unet.state_dict(), tmp_path / "unet.safetensors")
    target = TinyLDM(seed=2)
    report = warm_start(target, WarmStartConfig.from_config(
        {"path": str(tmp_path / "unet.safetensors"), "rename": {"": "model.diffusion_model."}}))
    assert len(report.loaded) == len(unet.state_dict()) and not report.unexpected
    assert torch.equal(target.model.diffusion_model.out[2].weight, unet.out[2].weight)


def test_bad_sources_are_named(tmp_path):
    save_safetensors({"something.else": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="nothing in .*other.safetensors fits TinyLDM"):
        warm_start(TinyLDM(), WarmStartConfig(str(tmp_path / "other.safetensors")))
    with pytest.raises(CheckpointError, match="from_ema: .*other.safetensors has no model_ema"):
        warm_start(TinyLDM(), WarmStartConfig(str(tmp_path / "other.safetensors"), from_ema=True))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        warm_start(TinyLDM(), WarmStartConfig(str(tmp_path / "missing.ckpt")))
    with pytest.raises(ValueError, match="unknown warm_start key\\(s\\) strict"):
        WarmStartConfig.from_config({"path": "x.ckpt", "strict": True})
    with pytest.raises(ValueError, match="warm_start.path"):
        WarmStartConfig.from_config({"from_ema": True})
