"""LoRA adapters (Hu et al. 2021) on the attention projections, through ``peft``: add, save, load, merge.

:func:`add_lora` injects low-rank adapters ``W + (alpha / rank) * B A`` into the ``nn.Linear`` modules of a root
module whose names match the target patterns (fnmatch globs over dotted module names; the defaults are the
``CrossAttention`` projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of the UNet's transformer blocks) and
leaves only the adapters trainable. :func:`save_lora` writes only the adapter weights as safetensors, keyed
``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` relative to the root, with metadata that records the
rank, alpha, target patterns and the ``[out, in]`` shape of every adapted module. :func:`load_lora` checks a file
against a model (every adapted module present with its shape, and no module the targets match left out) before
injecting and loading it, and by default merges it into the weights with a scale, so that the model has its
original modules and state-dict keys again. The config section (keys as in :meth:`LoraOptions.from_config`)::

    lora:
      rank: 4
      alpha: 4
      dropout: 0.0
      targets: ["model.diffusion_model.*.to_q", "model.diffusion_model.*.to_k",
                "model.diffusion_model.*.to_v", "model.diffusion_model.*.to_out.0"]
"""
from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, key_listing, read_safetensors, save_safetensors
from ldm.finetune.params import PatternError

logger = logging.getLogger(__name__)

LORA_FORMAT = "ldm-lora"
LORA_VERSION = "1"
ADAPTER = "default"
DEFAULT_TARGETS = tuple(f"model.diffusion_model.*.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0"))


class LoraMismatchError(CheckpointError):
    """A LoRA file does not fit the model it is loaded into."""


@dataclass(frozen=True)
class LoraOptions:
    """Rank, alpha (None: equal to the rank, a scale of 1), dropout and target patterns of the adapters."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one module pattern")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, key: str = "lora") -> "LoraOptions":
        """:raises ValueError: naming an unknown key."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown {key} key(s) {', '.join(unknown)}; allowed: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        if "targets" in config:
            targets = config["targets"]
            config["targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
        return cls(**config)


def _lora_layers(root: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in root.named_modules() if isinstance(m, LoraLayer)}


def target_modules(root: nn.Module, targets: Sequence[str], key: str = "lora.targets") -> list[str]:
    """The names of the ``nn.Linear`` modules of `root` that match any of `targets`.

    :raises PatternError: naming each pattern that matches no ``nn.Linear`` module.
    """
    linear = [name for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [f"{key}[{i}] {p!r}" for i, p in enumerate(targets)
                 if not any(fnmatch.fnmatchcase(n, p) for n in linear)]
    if unmatched:
        raise PatternError(f"{', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no nn.Linear module "
                           f"of {type(root).__name__} (patterns are fnmatch globs over dotted module names)")
    return [n for n in linear if any(fnmatch.fnmatchcase(n, p) for p in targets)]


def _inject(root: nn.Module, modules: Sequence[str], rank: int, alpha: float, dropout: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    if _lora_layers(root):
        raise ValueError(f"{type(root).__name__} already has LoRA adapters; merge or remove them first")
    pattern = "|".join(re.escape(name) for name in modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"(?:{pattern})")
    inject_adapter_in_model(config, root, adapter_name=ADAPTER)


def add_lora(root: nn.Module, options: LoraOptions) -> list[str]:
    """Injects fresh adapters (B = 0, so the model is unchanged) into the matching modules of `root`; afterwards
    only the adapter weights of `root` require gradients (every other parameter of `root` is frozen).

    :return: the names of the adapted modules.
    """
    modules = target_modules(root, options.targets)
    _inject(root, modules, options.rank, options.lora_alpha, options.dropout)
    logger.info("LoRA rank %d (alpha %g) on %d modules of %s", options.rank, options.lora_alpha, len(modules),
                type(root).__name__)
    return modules


def lora_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights: ``<module>.lora_A.weight`` [rank x in] and ``<module>.lora_B.weight`` [out x rank]."""
    out = {}
    for name, layer in _lora_layers(root).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    return out


def save_lora(root: nn.Module, path: str | Path, options: LoraOptions) -> None:
    """Writes only the adapter weights of `root` to a safetensors file, with the metadata that :func:`load_lora`
    checks.

    :raises ValueError: when `root` has no adapters.
    """
    layers = _lora_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no LoRA adapters to save")
    shapes = {name: [layer.out_features, layer.in_features] for name, layer in layers.items()}
    metadata = {"format": LORA_FORMAT, "version": LORA_VERSION, "rank": str(options.rank),
                "alpha": repr(options.lora_alpha), "targets": json.dumps(list(options.targets)),
                "modules": json.dumps(shapes), "root": type(root).__name__}
    save_safetensors(lora_state_dict(root), path, metadata=metadata)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the parsed metadata (rank, alpha, targets, modules, root) of a LoRA file.

    :raises FileNotFoundError, CheckpointError: naming the file when it is missing, unreadable or not a LoRA file.
    """
    path = Path(path)
    tensors, meta = read_safetensors(path, description="LoRA file")
    if meta.get("format") != LORA_FORMAT:
        raise CheckpointError(f"{path} is not a LoRA file of this project (metadata format "
                              f"{meta.get('format')!r}, expected {LORA_FORMAT!r})")
    try:
        info = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "targets": json.loads(meta["targets"]),
                "modules": json.loads(meta["modules"]), "root": meta.get("root", "?")}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"LoRA file {path} has bad metadata ({e}): {meta}") from None
    return tensors, info


def check_lora_fits(root: nn.Module, path: str | Path, tensors: Mapping[str, torch.Tensor],
                    info: Mapping[str, Any]) -> None:
    """Checks a LoRA file against `root`: every adapted module exists as an ``nn.Linear`` of the recorded shape,
    the tensors have the shapes of that rank, and the file leaves out no module that its targets match in `root`.

    :raises LoraMismatchError: naming the file and the keys that do not fit.
    """
    modules: dict[str, list[int]] = info["modules"]
    rank = info["rank"]
    own = dict(root.named_modules())
    absent, mismatched = [], []
    for name, (out_f, in_f) in modules.items():
        expected = {f"{name}.lora_A.weight": (rank, in_f), f"{name}.lora_B.weight": (out_f, rank)}
        layer = own.get(name)
        if not isinstance(layer, nn.Linear):
            absent.extend(expected)
            continue
        model_shapes = {f"{name}.lora_A.weight": (rank, layer.in_features),
                        f"{name}.lora_B.weight": (layer.out_features, rank)}
        for key, shape in expected.items():
            got = tuple(tensors[key].shape) if key in tensors else None
            if got != shape or got != model_shapes[key]:
                mismatched.append(f"{key} (file {list(got) if got else 'absent'}, model expects "
                                  f"{list(model_shapes[key])})")
    described = {f"{name}.lora_{part}.weight" for name in modules for part in "AB"}
    undescribed = sorted(k for k in tensors if k not in described)
    file_modules = set(modules)
    linear = [n for n, m in own.items() if isinstance(m, nn.Linear)]
    left_out = [f"{n}.lora_A.weight" for n in linear if n not in file_modules
                and any(fnmatch.fnmatchcase(n, p) for p in info["targets"])]
    problems = [key_listing(title, items) for title, items in
                (("keys for modules the model lacks", absent), ("shape mismatches", mismatched),
                 ("keys its metadata does not describe", undescribed),
                 ("keys missing for modules the file's targets match in the model", left_out)) if items]
    if problems:
        raise LoraMismatchError(f"LoRA file {path} (made for {info['root']}) does not fit "
                                f"{type(root).__name__}: " + "; ".join(problems))


def clear_encoder_caches(root: nn.Module) -> None:
    """Drops the cached outputs of every submodule of `root` that keeps one (``clear_cache()``, e.g. the frozen
    Hugging Face text encoder), after its weights changed."""
    for m in root.modules():
        clear = getattr(m, "clear_cache", None)
        if callable(clear):
            clear()


def set_lora_scale(root: nn.Module, scale: float) -> None:
    """Scales the unmerged adapters of `root`: the update becomes ``scale * (alpha / rank) * B A``."""
    for layer in _lora_layers(root).values():
        layer.set_scale(ADAPTER, scale)


def merge_lora(root: nn.Module) -> nn.Module:
    """Adds each adapter's update (at its current scale) to its base weight and puts the plain base modules back,
    so that `root` has its original modules and state-dict keys."""
    for name, layer in _lora_layers(root).items():
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config
    return root


@torch.no_grad()
def load_lora(root: nn.Module, path: str | Path, scale: float = 1.0, merge: bool = True) -> nn.Module:
    """Loads the adapters of a LoRA file into `root` after checking that they fit (see :func:`check_lora_fits`).

    :param scale: multiplies the adapter update (1: as trained; 0: no effect).
    :param merge: merge the adapters into the weights (for sampling; the parameters keep their ``requires_grad``)
        instead of keeping them as modules (then, as after :func:`add_lora`, only the adapters are trainable).
    :return: `root`, changed in place.
    :raises LoraMismatchError: naming the file and the keys that do not fit.
    """
    tensors, info = read_lora(path)
    check_lora_fits(root, path, tensors, info)
    requires_grad = {p: p.requires_grad for p in root.parameters()}
    _inject(root, list(info["modules"]), info["rank"], info["alpha"], 0.0)
    for name, layer in _lora_layers(root).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[ADAPTER].weight
            weight.copy_(tensors[f"{name}.{part}.weight"].to(weight.dtype))
    set_lora_scale(root, scale)
    clear_encoder_caches(root)
    logger.info("loaded LoRA %s (rank %d, %d modules) into %s at scale %g%s", path, info["rank"],
                len(info["modules"]), type(root).__name__, scale, ", merged" if merge else "")
    if not merge:
        return root
    merge_lora(root)
    for param, flag in requires_grad.items():
        param.requires_grad_(flag)
    return root


@torch.no_grad()
def load_lora_for_sampling(model: nn.Module, path: str | Path, scale: float = 1.0) -> nn.Module:
    """Merges a LoRA file into a diffusion model for sampling (:func:`load_lora`) and adds the same weight change
    to the EMA copies of the adapted weights (``model_ema``, when the model keeps one), so that sampling with the
    EMA weights (as the sampling scripts do) samples the base EMA plus the adapters.

    :return: `model`, changed in place.
    :raises LoraMismatchError: naming the file and the keys that do not fit.
    """
    _, info = read_lora(path)
    adapted = [f"{name}.weight" for name in info["modules"]]
    before = {name: model.get_parameter(name).detach().clone() for name in adapted}
    load_lora(model, path, scale=scale)
    ema = getattr(model, "model_ema", None) if getattr(model, "use_ema", False) else None
    if ema is None:
        return model
    shadows = dict(ema.named_buffers())
    for name, old in before.items():
        s_name = ema.m_name2s_name.get(name[len("model."):]) if name.startswith("model.") else None
        if s_name is not None:
            shadows[s_name].add_(model.get_parameter(name) - old)
    return model
