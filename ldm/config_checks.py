"""Checks of a merged config that fail before anything is built: wrong types, impossible values, image sizes
that the autoencoder cannot encode. ``main.py`` calls :func:`validate_config` right after merging the configs."""
from __future__ import annotations

import enum
import math
from typing import Any

from ldm.util import ConfigError


class _Check(enum.Enum):
    POSITIVE_NUMBER = "a positive number"
    POSITIVE_INT = "a positive integer"
    STEP_LIMIT = "an integer (-1 for no limit)"


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def _invalid(value: Any, check: _Check) -> bool:
    if isinstance(value, bool) or value is None:
        return value is not None
    if check is _Check.POSITIVE_NUMBER:
        return not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
    if check is _Check.POSITIVE_INT:
        return not isinstance(value, int) or value <= 0
    return not isinstance(value, int) or value < -1


_SCALAR_CHECKS = (
    ("model.base_learning_rate", _Check.POSITIVE_NUMBER),
    ("data.params.batch_size", _Check.POSITIVE_INT),
    ("lightning.trainer.max_steps", _Check.STEP_LIMIT),
    ("lightning.trainer.max_epochs", _Check.STEP_LIMIT),
    ("lightning.trainer.accumulate_grad_batches", _Check.POSITIVE_INT),
    ("model.params.timesteps", _Check.POSITIVE_INT),
)
_DDCONFIG_KEYS = ("model.params.first_stage_config.params.ddconfig", "model.params.ddconfig")
_UNET_SIZE_KEY = "model.params.unet_config.params.image_size"
_DATA_SPLITS = ("train", "validation", "test")


def _downsampling(config: Any) -> tuple[str, int] | None:
    """(dotted key of ch_mult, f = 2 ** (len(ch_mult) - 1)) of the autoencoder, if the config has one."""
    for key in _DDCONFIG_KEYS:
        ch_mult = _get(config, f"{key}.ch_mult")
        if ch_mult is not None:
            return f"{key}.ch_mult", 2 ** (len(ch_mult) - 1)
    return None


def _size_problems(config: Any) -> list[str]:
    found = _downsampling(config)
    if found is None:
        return []
    ch_key, f = found
    unet_size = _get(config, _UNET_SIZE_KEY)
    problems = []
    for split in _DATA_SPLITS:
        # a dataset that resizes to `size` and then crops trains on `crop_size`
        key = next((f"data.params.{split}.params.{k}" for k in ("crop_size", "size")
                    if _get(config, f"data.params.{split}.params.{k}") is not None), "")
        size = _get(config, key) if key else None
        if size is None or isinstance(size, bool) or not isinstance(size, int):
            continue
        if size % f:
            problems.append(f"{key}={size} is not divisible by the autoencoder's downsampling factor f={f} "
                            f"(from {ch_key})")
        elif isinstance(unet_size, int) and unet_size * f != size:
            problems.append(f"{_UNET_SIZE_KEY}={unet_size} does not match {key}={size}: the latent of a "
                            f"{size}px image is {size // f}px with f={f} (from {ch_key})")
    return problems


def validate_config(config: Any, lightning_config: Any = None) -> None:
    """Checks a merged config for wrong types and impossible values before anything is built.

    :param config: the merged config (``model``, ``data``, and ``lightning`` unless given separately).
    :param lightning_config: its ``lightning`` section, when the caller has split it off.
    :raises ConfigError: naming every offending dotted key and its value.
    """
    problems = []
    for key, check in _SCALAR_CHECKS:
        if lightning_config is not None and key.startswith("lightning."):
            value = _get(lightning_config, key[len("lightning."):])
        else:
            value = _get(config, key)
        if _invalid(value, check):
            problems.append(f"{key} must be {check.value}, got {value!r}")
    problems += _size_problems(config)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
