"""The performance options (model.performance): the same outputs and gradients as eager float32, applied by main.py.

Tolerances (tiny UNet, float32 reference, inputs of unit scale):
- channels-last, activation checkpointing: outputs and gradients equal to 1e-5 (the same arithmetic, reordered);
- torch.compile: 1e-4 relative (inductor fuses and reorders float32 reductions);
- bf16 autocast: relative L2 error of the output and of all gradients together below 2e-2 and 5e-2 (bfloat16 keeps 8
  mantissa bits: ~4e-3 per rounding, growing through ~30 layers).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.performance import (CPU_TRAINING_INDUCTOR_OPTIONS, PerformanceOptions, apply_performance_options,
                             optimizer_options)
from ldm.util import ConfigError, instantiate_from_config

CONFIGS = Path(__file__).parent / "configs"


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_unet(**overrides) -> UNetModel:
    cfg = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
               attention_resolutions=[1, 2], channel_mult=[1, 2], num_heads=-1, num_head_channels=16,
               use_spatial_transformer=True, context_dim=8)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = UNetModel(**cfg)
    with torch.no_grad():  # zero-initialised output layers would hide differences
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 4, 8, generator=g)


def output_and_grads(model: torch.nn.Module, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the concatenated parameter gradients of ``output.square().mean()``."""
    x, t, ctx = inputs()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, context=ctx)
    out.float().square().mean().backward()
    return out.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("section, tol", [
    ({"channels_last": True}, 1e-5),
    ({"activation_checkpointing": True}, 1e-5),
    ({"channels_last": True, "activation_checkpointing": True}, 1e-5),
    ({"compile": {"backend": "aot_eager"}}, 1e-5),
])
def test_options_give_the_eager_float32_outputs_and_gradients(section, tol):
    # tracing for torch.compile takes a while: one level is enough to check the graph capture
    overrides = dict(channel_mult=[1], attention_resolutions=[1]) if "compile" in section else {}
    ref_out, ref_grads = output_and_grads(tiny_unet(**overrides))
    model = tiny_unet(**overrides)
    apply_performance_options(model, section)
    out, grads = output_and_grads(model)
    assert relative_error(out, ref_out) < tol and relative_error(grads, ref_grads) < tol
    if section.get("channels_last"):
        assert model.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    if "compile" in section:
        assert model._compiled_call_impl is not None and "out.2.weight" in model.state_dict()  # keys unchanged
    if section.get("activation_checkpointing"):
        assert all(b.use_checkpoint for b in model.modules() if hasattr(b, "use_checkpoint"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_inductor_compiled_unet_matches_eager():
    """Slow: inductor generates and compiles C++ kernels for the forward and the backward (minutes on 2 CPU cores);
    the aot_eager case above checks the graph capture (checkpointing, hooks) in seconds."""
    overrides = dict(channel_mult=[1], attention_resolutions=[1])
    ref_out, ref_grads = output_and_grads(tiny_unet(**overrides))
    model = tiny_unet(**overrides)
    apply_performance_options(model, {"compile": True})
    out, grads = output_and_grads(model)
    assert relative_error(out, ref_out) < 1e-4 and relative_error(grads, ref_grads) < 1e-4


def test_compile_on_cpu_turns_inductors_layout_optimisation_off_for_trained_networks(monkeypatch):
    import torch._inductor.config as inductor_config

    assert all(hasattr(inductor_config, key) for key in CPU_TRAINING_INDUCTOR_OPTIONS)  # still inductor's names
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    for section, device_type in [({"compile": True}, "cpu"), ({"compile": True}, "cuda"),
                                 ({"compile": {"mode": "max-autotune"}}, "cpu"),
                                 ({"compile": {"backend": "aot_eager"}}, "cpu"),
                                 ({"compile": {"dynamic": False}}, "cpu")]:
        apply_performance_options(tiny_unet(), section, device_type=device_type)
    frozen = tiny_unet().requires_grad_(False)  # a network that only infers keeps inductor's own choice
    apply_performance_options(frozen, {"compile": True}, device_type="cpu")
    off = CPU_TRAINING_INDUCTOR_OPTIONS
    assert seen == [{"options": off}, {}, {"mode": "max-autotune"}, {"backend": "aot_eager"},
                    {"dynamic": False, "options": off}, {}]


def test_bf16_autocast_stays_within_its_tolerance_of_float32():
    ref_out, ref_grads = output_and_grads(tiny_unet())
    for section in ({}, {"channels_last": True, "activation_checkpointing": True}):
        model = tiny_unet()
        apply_performance_options(model, section)
        out, grads = output_and_grads(model, autocast=True)
        assert 0 < relative_error(out, ref_out) < 2e-2  # > 0: autocast really ran in bfloat16
        assert relative_error(grads, ref_grads) < 5e-2


def test_activation_checkpointing_option_overrides_use_checkpoint_both_ways():
    model = tiny_unet(use_checkpoint=True)
    apply_performance_options(model, {"activation_checkpointing": False})
    blocks = [m for m in model.modules() if hasattr(m, "use_checkpoint") or hasattr(m, "checkpoint")]
    assert len(blocks) > 5
    assert not any(getattr(m, "use_checkpoint", False) or getattr(m, "checkpoint", False) is True for m in blocks)
    # absent: the config's use_checkpoint stays
    kept = tiny_unet(use_checkpoint=True)
    apply_performance_options(kept, None)
    assert all(b.checkpoint for b in kept.modules() if type(b).__name__ == "BasicTransformerBlock")


@pytest.mark.parametrize("section, match", [
    ({"chanels_last": True}, r"model\.performance\.chanels_last'.*did you mean 'channels_last'"),
    ({"precision": "bf16"}, r"lightning\.trainer\.precision"),
    ({"tf32": "yes"}, r"model\.performance\.tf32' must be true or false"),
    ({"compile": {"modes": "max-autotune"}}, r"model\.performance\.compile\.modes"),
])
def test_bad_performance_keys_are_named(section, match):
    with pytest.raises(ConfigError, match=match):
        PerformanceOptions.from_config(section)


def tiny_ldm() -> torch.nn.Module:
    cfg = OmegaConf.load(CONFIGS / "ldm-stage2.yaml").model
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    model.learning_rate = 1e-3
    return model


def test_fused_adamw_only_when_asked_and_the_same_update():
    plain, fused = tiny_ldm(), tiny_ldm()
    apply_performance_options(plain, None)
    apply_performance_options(fused, {"fused_adamw": True})
    opts = [m.configure_optimizers() for m in (plain, fused)]
    assert not opts[0].defaults.get("fused") and opts[1].defaults["fused"] is True
    for model, opt in zip((plain, fused), opts):
        for p in model.trainable_parameters():
            p.grad = torch.full_like(p, 0.01) * torch.sign(p.detach() + 1e-3)
        opt.step()
    for a, b in zip(plain.trainable_parameters(), fused.trainable_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert optimizer_options(fused, [torch.zeros(2, dtype=torch.long)]) == {}  # no fused kernel for integers


def test_main_builds_the_model_with_the_config_performance_section(tmp_path):
    from ldm.cli import parse_cli
    from ldm.train import build

    opt, unknown = parse_cli(["--base", str(CONFIGS / "ldm-stage2.yaml"), "-t", "-l", str(tmp_path),
                              "model.performance.channels_last=true",
                              "model.performance.activation_checkpointing=true",
                              "model.performance.fused_adamw=true", "lightning.trainer.precision=bf16-mixed",
                              "lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=0",
                              "lightning.callbacks.image_logger=null"])
    _, _, model, data, trainer = build(opt, unknown, "now")
    unet = model.model.diffusion_model
    assert unet.out[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.performance_options.fused_adamw and unet.use_checkpoint
    assert all(b.checkpoint for b in unet.modules() if type(b).__name__ == "BasicTransformerBlock")
    assert not model.first_stage_model.encoder.use_checkpoint  # frozen: nothing to recompute
    before = unet.out[2].weight.detach().clone()
    trainer.fit(model, data)
    assert trainer.global_step == 2 and str(trainer.precision) == "bf16-mixed"
    assert trainer.optimizers[0].defaults["fused"] is True
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and not torch.equal(before, unet.out[2].weight)
