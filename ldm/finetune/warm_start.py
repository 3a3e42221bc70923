"""Warm start: load whatever fits from a compatible checkpoint and report what was loaded, skipped and left new.

Reads an original CompVis ``.ckpt``, one of ours, a bare state dict or a ``.safetensors`` file through
:func:`ldm.checkpoint.load_state_dict` (pickles never execute code). Before matching, checkpoint keys can be
dropped by prefix (``ignore``, applied to the checkpoint's own keys) and then renamed by prefix (``rename``, the
longest matching prefix wins: ``{"": "model.diffusion_model."}`` puts a bare UNet state dict in place); with
``from_ema`` the weights ``model.<name>`` are taken from the checkpoint's LitEma shadows
``model_ema.<name without dots>``. Then every key of the module is either loaded (same name and shape), skipped
(the checkpoint has it with another shape) or left new (not in the checkpoint), and every checkpoint key the
module lacks is unexpected. The config section (keys as in :meth:`WarmStartConfig.from_config`)::

    warm_start:
      path: logs/<run>/checkpoints/last.ckpt
      from_ema: true
      ignore: [cond_stage_model.]
      rename: {"": "model.diffusion_model."}
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, key_listing, load_state_dict
from ldm.modules.ema import shadow_name

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmStartConfig:
    """Where to warm-start from and how to map the checkpoint's keys; see the module docstring."""

    path: str
    from_ema: bool = False
    ignore: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str = "warm_start") -> "WarmStartConfig":
        """:raises ValueError: naming an unknown key or a missing ``path``."""
        unknown = sorted(set(config) - {"path", "from_ema", "ignore", "rename"})
        if unknown:
            raise ValueError(f"unknown {key} key(s) {', '.join(unknown)}; allowed: from_ema, ignore, path, rename")
        if not config.get("path"):
            raise ValueError(f"{key}.path must name the checkpoint to start from")
        ignore = config.get("ignore") or ()
        return cls(str(config["path"]), bool(config.get("from_ema", False)),
                   (ignore,) if isinstance(ignore, str) else tuple(ignore),
                   tuple((str(k), str(v)) for k, v in (config.get("rename") or {}).items()))


@dataclass
class WarmStartReport:
    """What :func:`warm_start` did, key by key (module keys for loaded/shape_mismatched/new)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...] | None, tuple[int, ...]]] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        mismatched = [f"{k} (checkpoint {c}, model {m})" for k, c, m in self.shape_mismatched]
        parts = [key_listing("loaded", self.loaded), key_listing("skipped for their shape", mismatched),
                 key_listing("left new", self.new), key_listing("unexpected", self.unexpected),
                 key_listing("ignored", self.ignored)]
        return f"warm start from {self.source}: " + "; ".join(parts)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _renamed(key: str, rename: tuple[tuple[str, str], ...]) -> str:
    best = max((pair for pair in rename if key.startswith(pair[0])), key=lambda pair: len(pair[0]), default=None)
    return key if best is None else best[1] + key[len(best[0]):]


def _take_ema_weights(state_dict: dict[str, Any], module_keys: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`state_dict` with each ``model.<name>`` replaced by its shadow ``model_ema.<name without dots>``."""
    out = dict(state_dict)
    replaced = 0
    for key in module_keys:
        if key.startswith("model.") and f"model_ema.{shadow_name(key[len('model.'):])}" in state_dict:
            out[key] = state_dict[f"model_ema.{shadow_name(key[len('model.'):])}"]
            replaced += 1
    if not replaced:
        raise CheckpointError(f"warm_start.from_ema: {source} has no model_ema.* weights for the model's model.* "
                              f"parameters")
    logger.info("warm start: %d tensors taken from the EMA weights of %s", replaced, source)
    return out


def warm_start(module: nn.Module, config: WarmStartConfig) -> WarmStartReport:
    """Loads into `module` every tensor of the checkpoint that fits it (see the module docstring).

    :return: the report (also logged).
    :raises FileNotFoundError, CheckpointError: for a missing or unreadable file (naming it), or when nothing in
        it fits the module.
    """
    source = str(Path(config.path))
    raw = load_state_dict(config.path)
    report = WarmStartReport(source)
    state_dict: dict[str, Any] = {}
    for key, value in raw.items():
        if config.ignore and key.startswith(config.ignore):
            report.ignored.append(key)
        else:
            state_dict[_renamed(key, config.rename)] = value
    own = module.state_dict()
    if config.from_ema:
        state_dict = _take_ema_weights(state_dict, own, source)
    to_load = {}
    for key, value in own.items():
        if key not in state_dict:
            report.new.append(key)
        elif isinstance(value, torch.Tensor) and _shape(state_dict[key]) != tuple(value.shape):
            report.shape_mismatched.append((key, _shape(state_dict[key]), tuple(value.shape)))
            report.new.append(key)
        else:
            to_load[key] = state_dict[key]
            report.loaded.append(key)
    report.unexpected = [k for k in state_dict if k not in own]
    if not to_load:
        raise CheckpointError(f"nothing in {source} fits {type(module).__name__}: {report.summary()}")
    module.load_state_dict(to_load, strict=False)
    logger.info(report.summary())
    return report
