"""Every LDM model section of the reference configs instantiates unchanged (on the meta device), and a state
dict with the ORIGINAL names and shapes (tests/data/reference_state_dicts) loads into it with strict=True."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import allow_missing_checkpoints
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.schedule import BUFFER_NAMES
from ldm.util import accepted_arguments, instantiate_from_config
from tests.helpers.paths import REFERENCE_CONFIGS

HERE = Path(__file__).parent
REFERENCE = REFERENCE_CONFIGS
MANIFESTS = HERE / "data" / "reference_state_dicts"
CLIP_STANDIN = {"target": "tests.test_ddpm_support.clip_vit_l14_text_encoder"}


def reference_files() -> list[Path]:
    files = sorted(REFERENCE.glob("latent-diffusion/models/ldm/*/config.yaml"))
    files += sorted(REFERENCE.glob("latent-diffusion/configs/latent-diffusion/*.yaml"))
    files += [REFERENCE / "latent-diffusion/configs/retrieval-augmented-diffusion/768x768.yaml",
              REFERENCE / "stable-diffusion/configs/stable-diffusion/v1-inference.yaml"]
    return [f for f in files if f.exists()]


FILES = reference_files()
pytestmark = pytest.mark.skipif(not FILES, reason=f"reference configs not found under {REFERENCE}")


def build_on_meta(model_cfg):
    """The model of a config on the meta device; only a text encoder that would need a download is replaced."""
    if "FrozenCLIPEmbedder" in str(model_cfg.params.cond_stage_config):
        model_cfg = OmegaConf.merge(model_cfg, {"params": {"cond_stage_config": CLIP_STANDIN}})
    with torch.device("meta"):
        return instantiate_from_config(allow_missing_checkpoints(model_cfg))


def expected_keys(model: LatentDiffusion, rel: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes the original LatentDiffusion has for this config, from the network manifests."""
    index = json.loads((MANIFESTS / "index.json").read_text())[rel]
    unet = json.loads((MANIFESTS / index["unet"]).read_text())
    sd = {f"model.diffusion_model.{k}": tuple(v) for k, v in unet.items()}
    if model.use_ema:
        sd["model_ema.decay"], sd["model_ema.num_updates"] = (), ()
        sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): tuple(v) for k, v in unet.items()})
    if "cond" in index:
        cond = json.loads((MANIFESTS / index["cond"]).read_text())
        sd.update({f"cond_stage_model.{k}": tuple(v) for k, v in cond.items()})
    T = model.num_timesteps
    sd.update({name: (T,) for name in BUFFER_NAMES})
    if model.scale_by_std:
        sd["scale_factor"] = ()
    # the first stage is stage one's (its own tests check its names); the same keys again when it also conditions
    for k, v in model.state_dict().items():
        if k.startswith("first_stage_model."):
            sd[k] = tuple(v.shape)
            if model.cond_stage_model is model.first_stage_model:
                sd["cond_stage_model." + k[len("first_stage_model."):]] = tuple(v.shape)
    return sd


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(REFERENCE)) for f in FILES])
def test_reference_config_instantiates_and_loads_original_state_dict(path):
    cfg = OmegaConf.load(path)
    accepted, _, _ = accepted_arguments(LatentDiffusion)
    assert set(cfg.model.params) <= accepted  # every key is an explicit argument (of LatentDiffusion or DDPM)
    model = build_on_meta(cfg.model)
    assert isinstance(model, LatentDiffusion)
    rel = str(path.relative_to(REFERENCE))
    index = json.loads((MANIFESTS / "index.json").read_text())
    if rel not in index:
        pytest.skip(f"no manifest of the original networks for {rel}")
    expected = expected_keys(model, rel)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    original = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    model.load_state_dict(original, strict=True)


PROJECT_CONFIGS = sorted((HERE.parent / "configs" / "ldm").glob("*.yaml"))


@pytest.mark.parametrize("path", PROJECT_CONFIGS, ids=[p.name for p in PROJECT_CONFIGS])
def test_project_ldm_config_builds_and_names_resolvable_data(path):
    from ldm.util import check_arguments, get_obj_from_str

    cfg = OmegaConf.load(path)
    model = build_on_meta(cfg.model)
    assert isinstance(model, LatentDiffusion) and cfg.model.base_learning_rate > 0
    fs_ckpt = cfg.model.params.first_stage_config.params.ckpt_path
    assert fs_ckpt.startswith("models/first_stage_models/") and fs_ckpt.endswith("/model.ckpt")
    unet = cfg.model.params.unet_config.params
    concat = model.model.conditioning_key in ("concat", "hybrid")
    assert unet.in_channels > model.channels if concat else unet.in_channels == model.channels
    assert cfg.data.target == "main.DataModuleFromConfig"
    for split in ("train", "validation"):
        ds = cfg.data.params[split]
        check_arguments(get_obj_from_str(ds.target), dict(ds.params), ds.target)
