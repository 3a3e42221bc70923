"""Config checks that fail before training, and the plugin/callback factories main.py uses."""
from __future__ import annotations

import glob

import pytest
import torch
from omegaconf import OmegaConf

from ldm.callbacks.checkpoint_io import AtomicCheckpointIO
from ldm.callbacks.nonfinite import NonFiniteGuard
from ldm.callbacks.preemption import PreemptionCheckpoint
from ldm.callbacks.reliability import reliability_callbacks, reliability_plugins
from ldm.config_checks import validate_config
from ldm.data.sampler import ResumableSampler
from ldm.checkpoint import UnsafeCheckpointError, load_state_dict
from ldm.util import ConfigError
from tests.helpers.paths import REFERENCE_CONFIGS

REFERENCE_CONFIGS = sorted(glob.glob(str(REFERENCE_CONFIGS / "**" / "*.yaml"), recursive=True))


def _ldm_config(**overrides):
    cfg = OmegaConf.create({
        "model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                  "params": {"timesteps": 1000,
                             "unet_config": {"params": {"image_size": 32}},
                             "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}},
        "data": {"params": {"batch_size": 4, "train": {"params": {"size": 256}},
                            "validation": {"params": {"size": 256}}}},
        "lightning": {"trainer": {"max_steps": 100}},
    })
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def test_good_config_passes():
    """A valid config, and valid values at the edges of each check, pass, and the check leaves the config as it was."""
    for overrides in ({}, {"data.params.batch_size": 1, "model.base_learning_rate": 1e-12,
                           "data.params.train.params.size": 8, "data.params.validation.params.size": 8,
                           "model.params.unet_config.params.image_size": 1, "model.params.timesteps": 1,
                           "lightning.trainer.max_steps": 1}):
        cfg = _ldm_config(**overrides)
        before = OmegaConf.to_container(cfg)
        assert validate_config(cfg) is None
        assert OmegaConf.to_container(cfg) == before


@pytest.mark.parametrize("key,value,message", [
    ("model.base_learning_rate", -1e-4, "model.base_learning_rate must be a positive number, got -0.0001"),
    ("model.base_learning_rate", "fast", "model.base_learning_rate must be a positive number, got 'fast'"),
    ("data.params.batch_size", 0, "data.params.batch_size must be a positive integer, got 0"),
    ("data.params.batch_size", 2.5, "data.params.batch_size must be a positive integer, got 2.5"),
    ("lightning.trainer.max_steps", "1e5", "lightning.trainer.max_steps must be an integer"),
    ("model.params.timesteps", -5, "model.params.timesteps must be a positive integer"),
    ("data.params.train.params.size", 250, "data.params.train.params.size=250 is not divisible by the "
                                           "autoencoder's downsampling factor f=8"),
    ("model.params.unet_config.params.image_size", 64, "image_size=64 does not match "
                                                       "data.params.train.params.size=256"),
])
def test_bad_value_is_named(key, value, message):
    with pytest.raises(ConfigError) as info:
        validate_config(_ldm_config(**{key: value}))
    assert message in str(info.value)


def test_split_off_lightning_section_is_checked():
    cfg = _ldm_config()
    lightning = cfg.pop("lightning")
    lightning.trainer.max_epochs = 1.5
    with pytest.raises(ConfigError, match="lightning.trainer.max_epochs must be an integer"):
        validate_config(cfg, lightning)


def test_crop_size_is_the_training_size():
    cfg = _ldm_config(**{"data.params.train.params.size": 300, "data.params.train.params.crop_size": 256})
    validate_config(cfg)
    with pytest.raises(ConfigError, match="crop_size=260 is not divisible"):
        validate_config(_ldm_config(**{"data.params.train.params.crop_size": 260}))


def test_stage_one_config_checks_its_own_ddconfig():
    cfg = OmegaConf.create({"model": {"base_learning_rate": 4.5e-6, "params": {"ddconfig": {"ch_mult": [1, 2, 4]}}},
                            "data": {"params": {"batch_size": 2, "train": {"params": {"size": 30}}}}})
    with pytest.raises(ConfigError, match="size=30 is not divisible by .* f=4"):
        validate_config(cfg)


def test_every_reference_config_passes():
    """Every shared reference config passes, and is really checked: the same config with a bad batch size fails."""
    if not REFERENCE_CONFIGS:
        pytest.skip("reference configs not found (set LDM_SHARED_DIR; in CI the run stops, see conftest.py)")
    checked = 0
    for path in REFERENCE_CONFIGS:
        cfg = OmegaConf.load(path)
        validate_config(cfg)
        if OmegaConf.select(cfg, "data.params.batch_size") is not None:
            cfg.data.params.batch_size = 0
            with pytest.raises(ConfigError, match="data.params.batch_size must be a positive integer"):
                validate_config(cfg)
            checked += 1
    assert checked > 0


def test_factories_read_the_lightning_section(tmp_path):
    lightning = OmegaConf.create({"reliability": {"export_safetensors": True, "max_consecutive_nonfinite": 2,
                                                  "preemption_signals": ["SIGUSR2"]}})
    (io,) = reliability_plugins(lightning)
    assert isinstance(io, AtomicCheckpointIO) and io.export_safetensors
    callbacks = reliability_callbacks(lightning, tmp_path)
    preempt = next(c for c in callbacks if isinstance(c, PreemptionCheckpoint))
    guard = next(c for c in callbacks if isinstance(c, NonFiniteGuard))
    assert preempt.ckpt_path == tmp_path / "last.ckpt" and preempt.signals == [12]
    assert guard.max_consecutive == 2
    with pytest.raises(ConfigError, match="max_consecutive_nonfinite"):
        reliability_callbacks(OmegaConf.create({"reliability": {"max_consecutive_nonfinite": 0}}), tmp_path)
    with pytest.raises(ConfigError, match="SIGNOPE"):
        reliability_callbacks(OmegaConf.create({"reliability": {"preemption_signals": ["SIGNOPE"]}}), tmp_path)

    sd = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    io.save_checkpoint({"state_dict": sd, "global_step": 3}, tmp_path / "last.ckpt")
    exported = load_state_dict(tmp_path / "last.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in sd.items()) and set(exported) == set(sd)


def test_resumable_sampler_order_depends_on_seed_and_epoch_and_skips():
    a, b = ResumableSampler(20, seed=3), ResumableSampler(20, seed=3)
    first = list(a)
    assert sorted(first) == list(range(20)) and first == list(b)
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == list(range(20))
    a.skip(7)
    assert list(a) == second[7:] and list(a) == second  # the skip applies to one iteration only


class _Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').close()",)


def test_resume_loading_through_the_trainer_io_is_safe(tmp_path):
    """``main.py -r`` loads through AtomicCheckpointIO: a checkpoint whose pickle runs code is refused."""
    target = tmp_path / "created"
    torch.save({"state_dict": {}, "x": _Payload(str(target))}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not target.exists()
