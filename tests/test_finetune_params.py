"""Freeze/train patterns and per-group learning rates of a fine-tuning run."""
from __future__ import annotations

import pytest
import torch

from ldm.finetune.params import FinetuneConfig, PatternError, apply_freeze, build_param_groups, matches
from tests.helpers.finetune import TinyLDM, batch, train_steps


def test_patterns_match_globs_and_module_names():
    assert matches("model.diffusion_model.out.2.weight", "model.diffusion_model.out")
    assert not matches("model.diffusion_model.output_blocks.0.0.weight", "model.diffusion_model.out")
    assert matches("model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", "*.attn2.*")
    assert not matches("model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_k.weight", "*.attn2.*")


def test_frozen_parameters_stay_bit_identical_through_training():
    torch.manual_seed(0)
    model = TinyLDM()
    config = FinetuneConfig.from_config({
        "train": ["model.diffusion_model"],
        "freeze": ["model.diffusion_model.input_blocks", "*.norm*"],
        "param_groups": [{"name": "cross", "params": ["*.attn2.*"], "lr_scale": 10.0},
                         {"name": "out", "params": ["model.diffusion_model.out"], "lr": 1e-5, "weight_decay": 0.0}],
    })
    report = apply_freeze(model, config)
    assert "cond_stage_model.weight" in report.frozen  # not named by `train`
    assert not any(n.startswith("model.diffusion_model.input_blocks") for n in report.trainable)
    assert not any(".norm" in n for n in report.trainable)
    groups = build_param_groups(model, config, base_lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("cross", 1e-2), ("out", 1e-5), ("default", 1e-3)]
    assert groups[1]["weight_decay"] == 0.0
    in_optimiser = {id(p) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert in_optimiser == {id(named[n]) for n in report.trainable}  # no frozen parameter reaches the optimiser
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, torch.optim.AdamW(groups, weight_decay=0.1), steps=3)
    for name in report.frozen:
        assert torch.equal(named[name], before[name]), name
    changed = [n for n in report.trainable if not torch.equal(named[n], before[n])]
    assert len(changed) == len(report.trainable)


def test_group_learning_rates_reach_the_updates():
    """With plain SGD the update of a parameter is -lr * grad: the scaled group moves 10x as far per gradient."""
    model = TinyLDM()
    config = FinetuneConfig.from_config({"param_groups": [{"params": ["*.attn2.to_k"], "lr_scale": 10.0}]})
    apply_freeze(model, config)
    groups = build_param_groups(model, config, base_lr=1e-3)
    optimizer = torch.optim.SGD(groups)
    x, t, tokens, target = batch()
    ((model(x, t, tokens) - target) ** 2).mean().backward()
    k = model.model.diffusion_model.input_blocks[3][1].transformer_blocks[0].attn2.to_k.weight
    q = model.model.diffusion_model.input_blocks[3][1].transformer_blocks[0].attn2.to_q.weight
    k0, q0, gk, gq = k.detach().clone(), q.detach().clone(), k.grad.clone(), q.grad.clone()
    optimizer.step()
    torch.testing.assert_close(k.detach() - k0, -1e-2 * gk)
    torch.testing.assert_close(q.detach() - q0, -1e-3 * gq)


def test_patterns_that_match_nothing_are_named():
    model = TinyLDM()
    with pytest.raises(PatternError, match=r"finetune.freeze\[1\] 'model.diffusion_model.encoder\*' matches no "
                                           r"parameter of TinyLDM"):
        apply_freeze(model, FinetuneConfig.from_config({"freeze": ["*.attn1.*", "model.diffusion_model.encoder*"]}))
    with pytest.raises(PatternError, match=r"finetune.train\[0\] 'unet'"):
        apply_freeze(model, FinetuneConfig.from_config({"train": ["unet"]}))
    # a group pattern that only matches frozen parameters gets no parameter
    config = FinetuneConfig.from_config({"freeze": ["cond_stage_model"],
                                         "param_groups": [{"params": ["cond_stage_model.*"], "lr": 1.0}]})
    apply_freeze(model, config)
    with pytest.raises(PatternError, match=r"param_groups\[0\].params\[0\] 'cond_stage_model.\*' matches no "
                                           r"trainable parameter"):
        build_param_groups(model, config, 1e-4)
    with pytest.raises(ValueError, match="unknown finetune.param_groups\\[0\\] key\\(s\\) learning_rate"):
        FinetuneConfig.from_config({"param_groups": [{"params": ["*"], "learning_rate": 1.0}]})
    with pytest.raises(ValueError, match="unknown finetune key\\(s\\) freeze_patterns"):
        FinetuneConfig.from_config({"freeze_patterns": ["*"]})
