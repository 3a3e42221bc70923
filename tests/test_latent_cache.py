"""Latent caches: the same loss as encoding on the fly, resumable writing, and clear errors naming the file."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from ldm.data.emoji import EmojiDataset
from ldm.data.latent_cache import (FINGERPRINT_KEY, MANIFEST, MOMENTS_KEY, LatentCacheDataset, LatentCacheError,
                                   first_stage_fingerprint)
from ldm.data.latent_cache_writer import CachePlan, CacheWriter
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
STAGE2 = ROOT / "tests" / "configs" / "ldm-stage2.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("cache_latents", ROOT / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_and_ckpt(tmp_path_factory):
    """The tiny stage-two model of tests/configs/ldm-stage2.yaml and a checkpoint of it (its first stage is the
    one the cache script must use)."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(STAGE2).model)
    with torch.no_grad():  # give the zero-initialised output layer a value, so that the loss depends on the UNet
        model.model.diffusion_model.out[2].weight.normal_(0, 0.05)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    torch.save({"state_dict": model.first_stage_model.state_dict()}, ckpt.with_name("first_stage.ckpt"))
    return model, ckpt


def cache_args(out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--config", str(STAGE2), "--out", str(out), "--split", "validation", "--limit", "6",
            "--shard-size", "4", "--batch-size", "3", "--device", "cpu",
            f"model.params.first_stage_config.params.ckpt_path={ckpt.with_name('first_stage.ckpt')}", *extra]


@pytest.fixture(scope="module")
def cache(model_and_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    load_script().main(cache_args(out, model_and_ckpt[1]))
    return out / "validation"


def validation_images(n: int) -> list[dict]:
    params = OmegaConf.load(STAGE2).data.params.validation.params
    dataset = EmojiDataset(**params)
    return [dataset[i] for i in range(n)]


def test_cache_holds_the_posterior_of_each_image_and_its_fields(model_and_ckpt, cache):
    model, _ = model_and_ckpt
    dataset = LatentCacheDataset(cache)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert len(dataset) == 6 and sorted(manifest["shards"]) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert manifest["fingerprint"] == first_stage_fingerprint(model.first_stage_model) and manifest["kind"] == "moments"
    images = validation_images(6)
    x = torch.stack([torch.as_tensor(item["image"]) for item in images]).permute(0, 3, 1, 2)
    with torch.no_grad():
        moments = model.first_stage_model.encode(x).parameters
    for i, item in enumerate(images):
        cached = dataset[i]
        torch.testing.assert_close(cached[MOMENTS_KEY], moments[i], rtol=1e-5, atol=1e-5)
        assert int(cached["class_label"]) == item["class_label"] and cached["caption"] == item["caption"]
        assert cached[FINGERPRINT_KEY] == manifest["fingerprint"]


def test_training_loss_from_the_cache_equals_encoding_on_the_fly(model_and_ckpt, cache):
    model, _ = model_and_ckpt
    model.train()
    images = default_collate(validation_images(4))
    cached = default_collate([LatentCacheDataset(cache)[i] for i in range(4)])
    losses = []
    for batch in (images, cached):
        torch.manual_seed(7)  # the same posterior sample, conditioning dropout, timesteps and noise
        losses.append(model.shared_step(batch)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    # and the posterior really is sampled: another seed draws another z, hence another loss
    torch.manual_seed(8)
    assert not torch.allclose(model.shared_step(cached)[0], losses[0])


def test_a_spatial_condition_trains_from_the_cache_as_on_the_fly(model_and_ckpt, cache):
    """Concat conditioning on a map that the batch carries (as super-resolution's LR_image): a cached batch holds
    no image, and its map must still reach the model's device and give the on-the-fly loss."""
    config = OmegaConf.load(STAGE2).model
    config.params.update(cond_stage_key="lr_map", conditioning_key="concat", cond_stage_trainable=False,
                         ucg_rate=0.0, cond_stage_config={"target": "torch.nn.Identity"})
    config.params.unet_config.params.update(in_channels=2 + 3, context_dim=None, use_spatial_transformer=False)
    model = instantiate_from_config(config)
    model.first_stage_model.load_state_dict(model_and_ckpt[0].first_stage_model.state_dict())
    with torch.no_grad():  # a non-zero output layer, so that the loss depends on the UNet's inputs
        model.model.diffusion_model.out[2].weight.normal_(0, 0.05)
    model.train()
    lr_map = torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    images = default_collate(validation_images(4)) | {"lr_map": lr_map}
    cached = default_collate([LatentCacheDataset(cache)[i] for i in range(4)]) | {"lr_map": lr_map}
    losses = []
    for batch in (images, cached):
        torch.manual_seed(7)
        losses.append(model.shared_step(batch)[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)  # the map is really an input: another map, another loss
    assert not torch.allclose(model.shared_step(cached | {"lr_map": -lr_map})[0], losses[0])


def test_a_cache_of_another_first_stage_is_refused(model_and_ckpt, cache, tmp_path):
    model, ckpt = model_and_ckpt
    other = instantiate_from_config(OmegaConf.load(STAGE2).model)  # another random first stage
    batch = default_collate([LatentCacheDataset(cache)[i] for i in range(2)])
    with pytest.raises(LatentCacheError, match="different first stage"):
        other.shared_step(batch)
    # the writer refuses to add another first stage's shards to an existing cache
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    writer_args = dict(dataset=validation_images(6), batch_size=3)
    plan = CachePlan(**{k: v for k, v in json.loads((copy / MANIFEST).read_text()).items()
                                      if k in ("num_examples", "shard_size", "dtype", "image_key", "source")},
                                   fingerprint=first_stage_fingerprint(other.first_stage_model))
    with pytest.raises(LatentCacheError, match="different first stage"):
        CacheWriter(copy, other.first_stage_model, plan=plan, **writer_args)


def test_an_interrupted_cache_resumes_and_matches_one_run(model_and_ckpt, cache, tmp_path, monkeypatch):
    _, ckpt = model_and_ckpt
    script = load_script()
    calls = []
    original = CacheWriter._encode_shard

    def interrupted(self, index, count, progress):
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, index, count, progress)

    root = tmp_path / "resumed"
    out = root / "validation"
    monkeypatch.setattr(CacheWriter, "_encode_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main(cache_args(root, ckpt))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard-00000.safetensors"]  # no partial shard
    with pytest.raises(LatentCacheError, match="unfinished.*shard-00001"):
        LatentCacheDataset(out)
    calls.clear()
    script.main(cache_args(root, ckpt, "--ckpt", str(ckpt)))  # the same first stage, from the full checkpoint
    assert calls == [1]  # only the missing shard was encoded
    resumed, whole = LatentCacheDataset(out), LatentCacheDataset(cache)
    for i in range(6):
        assert torch.equal(resumed[i][MOMENTS_KEY], whole[i][MOMENTS_KEY])
    with pytest.raises(LatentCacheError, match="another shard_size"):
        script.main(cache_args(root, ckpt, "--shard-size", "3"))


def test_corrupt_or_foreign_shards_are_named(model_and_ckpt, cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = broken / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(LatentCacheError, match=r"shard-00001\.safetensors is corrupt or truncated"):
        LatentCacheDataset(broken)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # a flipped byte in the tensor data: only the checksum sees it
    shard.write_bytes(bytes(flipped))
    LatentCacheDataset(broken)
    with pytest.raises(LatentCacheError, match=r"shard-00001\.safetensors is corrupt: its sha256"):
        LatentCacheDataset(broken, verify_checksums=True)
    # a shard of another cache (here: the other position) dropped in place
    shutil.copy(cache / "shard-00000.safetensors", shard)
    with pytest.raises(LatentCacheError, match=r"shard-00001\.safetensors does not belong to this cache"):
        LatentCacheDataset(broken)
    with pytest.raises(LatentCacheError, match=r"no latent cache at .*cache\.json is missing"):
        LatentCacheDataset(tmp_path / "nothing")


def test_main_trains_stage_two_from_the_config_the_script_writes(model_and_ckpt, tmp_path):
    from ldm.cli import parse_cli
    from ldm.train import build

    _, ckpt = model_and_ckpt
    config = load_script().main(cache_args(tmp_path / "cache", ckpt, "--split", "train", "validation"))
    assert config == tmp_path / "cache" / "config.yaml"
    opt, unknown = parse_cli(["--base", str(config), "-t", "-l", str(tmp_path / "logs"),
                              "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger=null"])
    _, _, model, data, trainer = build(opt, unknown, "now")
    assert float(model.scale_factor) == 1.0
    trainer.fit(model, data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert float(model.scale_factor) != 1.0  # scale_by_std measured the cached latents


def test_a_deterministic_first_stage_caches_its_latents(tmp_path):
    """VQ first stages (VQModelInterface) encode to a tensor: the cache stores it, and batches carry it as is."""
    import numpy as np

    from ldm.data.latent_cache import LATENT_KEY, cached_encoding
    from ldm.models.autoencoder import VQModelInterface
    from ldm.models.diffusion.first_stage import freeze

    torch.manual_seed(0)
    vq = freeze(VQModelInterface(ddconfig=dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3,
                                               ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]),
                                 lossconfig={"target": "torch.nn.Identity"}, n_embed=8, embed_dim=3))
    rng = np.random.default_rng(0)
    data = [{"image": rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32), "class_label": i} for i in range(5)]
    plan = CachePlan(fingerprint=first_stage_fingerprint(vq), num_examples=5, shard_size=2, dtype="float16",
                     image_key="image", source={"test": True})
    CacheWriter(tmp_path, vq, data, plan, batch_size=2).write()
    dataset = LatentCacheDataset(tmp_path, keys=["class_label"])
    x = torch.stack([torch.as_tensor(d["image"]) for d in data]).permute(0, 3, 1, 2)
    with torch.no_grad():
        h = vq.encode(x)
    batch = default_collate([dataset[i] for i in range(5)])
    assert set(batch) == {LATENT_KEY, FINGERPRINT_KEY, "class_label"} and batch[LATENT_KEY].dtype == torch.float32
    # stored as float16, as asked: within its rounding (2^-11 relative), and not bit-equal to float32
    torch.testing.assert_close(batch[LATENT_KEY], h, rtol=1e-3, atol=1e-3)
    assert not torch.equal(batch[LATENT_KEY], h)
    assert torch.equal(batch["class_label"], torch.arange(5))
    latents = cached_encoding(batch, vq, torch.device("cpu"), n=3)
    assert torch.equal(latents, batch[LATENT_KEY][:3])
