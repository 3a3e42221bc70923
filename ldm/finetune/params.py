"""Which parameters a fine-tuning run trains, and at which learning rate: patterns over parameter names.

A pattern is an ``fnmatch`` glob over the dotted parameter names of the module (``*`` also crosses dots) or the
name of a submodule, which stands for all of its parameters: ``model.diffusion_model.out`` matches
``model.diffusion_model.out.2.weight``; ``model.diffusion_model.*.attn2.*`` matches every cross-attention
parameter. The config section (keys as in :meth:`FinetuneConfig.from_config`)::

    train: [model.diffusion_model.*]          # optional: train only these (default: what the model trains)
    freeze: [model.diffusion_model.input_blocks.*]    # then freeze these
    param_groups:                             # optional per-group learning rates, first match wins
      - {name: cross_attention, params: ["model.diffusion_model.*.attn2.*"], lr_scale: 10.0}
      - {name: out, params: [model.diffusion_model.out], lr: 1.0e-5, weight_decay: 0.0}

:func:`apply_freeze` sets ``requires_grad``; :func:`build_param_groups` returns the optimiser's parameter groups
(trainable parameters only; those in no group share the base learning rate). Every pattern must match: one that
matches no parameter is a :class:`PatternError` naming it and its config key.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

logger = logging.getLogger(__name__)


class PatternError(ValueError):
    """A parameter pattern in the fine-tuning config matches no parameter."""


def matches(name: str, pattern: str) -> bool:
    """Whether parameter `name` matches `pattern`: as a glob, or as a prefix module name."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _as_patterns(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{key} must be a list of parameter-name patterns, got {value!r}")
    return tuple(value)


def _check_keys(mapping: Mapping[str, Any], allowed: Iterable[str], key: str) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {key} key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


@dataclass(frozen=True)
class ParamGroupSpec:
    """One optimiser parameter group: the parameters matching `params`, at `lr` or ``lr_scale * base_lr``."""

    name: str
    params: tuple[str, ...]
    lr: float | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None

    def learning_rate(self, base_lr: float) -> float:
        if self.lr is not None:
            return self.lr
        return base_lr * (self.lr_scale if self.lr_scale is not None else 1.0)


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train and freeze, and the parameter groups; see the module docstring."""

    train: tuple[str, ...] | None = None
    freeze: tuple[str, ...] = ()
    param_groups: tuple[ParamGroupSpec, ...] = field(default_factory=tuple)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, key: str = "finetune") -> "FinetuneConfig":
        """Parses the ``finetune`` config section (None: train what the model trains, one group).

        :raises ValueError: naming the key of an unknown or malformed entry.
        """
        if config is None:
            return cls()
        _check_keys(config, ("train", "freeze", "param_groups"), key)
        train = config.get("train")
        groups = []
        for i, group in enumerate(config.get("param_groups") or ()):
            gkey = f"{key}.param_groups[{i}]"
            _check_keys(group, ("name", "params", "lr", "lr_scale", "weight_decay"), gkey)
            if "params" not in group:
                raise ValueError(f"{gkey} needs 'params': a list of parameter-name patterns")
            if group.get("lr") is not None and group.get("lr_scale") is not None:
                raise ValueError(f"{gkey} sets both lr and lr_scale; give one")
            groups.append(ParamGroupSpec(str(group.get("name", f"group{i}")),
                                         _as_patterns(group["params"], f"{gkey}.params"),
                                         group.get("lr"), group.get("lr_scale"), group.get("weight_decay")))
        return cls(None if train is None else _as_patterns(train, f"{key}.train"),
                   _as_patterns(config.get("freeze") or (), f"{key}.freeze"), tuple(groups))


def _unmatched(names: Sequence[str], patterns: Sequence[str]) -> list[int]:
    return [i for i, p in enumerate(patterns) if not any(matches(n, p) for n in names)]


def _raise_unmatched(patterns: Sequence[str], unmatched: Sequence[int], key: str, what: str,
                     module: nn.Module) -> None:
    if unmatched:
        listed = ", ".join(f"{key}[{i}] {patterns[i]!r}" for i in unmatched)
        raise PatternError(f"{listed} match{'es' if len(unmatched) == 1 else ''} no {what} of "
                           f"{type(module).__name__} (patterns are fnmatch globs over dotted parameter names, or "
                           f"submodule names)")


@dataclass(frozen=True)
class FreezeReport:
    """The parameter names left trainable and frozen by :func:`apply_freeze`."""

    trainable: list[str]
    frozen: list[str]


def apply_freeze(module: nn.Module, config: FinetuneConfig, key: str = "finetune") -> FreezeReport:
    """Sets ``requires_grad`` of every parameter of `module` from `config`: with ``train``, exactly the matching
    parameters are trainable; then the ``freeze`` matches are frozen.

    :raises PatternError: naming every ``train``/``freeze`` pattern that matches no parameter.
    """
    names = [n for n, _ in module.named_parameters()]
    if config.train is not None:
        _raise_unmatched(config.train, _unmatched(names, config.train), f"{key}.train", "parameter", module)
    _raise_unmatched(config.freeze, _unmatched(names, config.freeze), f"{key}.freeze", "parameter", module)
    for name, param in module.named_parameters():
        if config.train is not None:
            param.requires_grad_(any(matches(name, p) for p in config.train))
        if any(matches(name, p) for p in config.freeze):
            param.requires_grad_(False)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    logger.info("fine-tuning %s: %d parameter tensors trainable, %d frozen", type(module).__name__, len(trainable),
                len(frozen))
    return FreezeReport(trainable, frozen)


def build_param_groups(module: nn.Module, config: FinetuneConfig, base_lr: float,
                       key: str = "finetune") -> list[dict[str, Any]]:
    """The optimiser parameter groups of the trainable parameters of `module`.

    Each trainable parameter goes to the first group with a matching pattern, the rest to a group ``default``
    at `base_lr`. A group dict has ``params``, ``lr``, ``name`` and, where set, ``weight_decay``.

    :raises PatternError: naming a group pattern that matches no trainable parameter.
    :raises ValueError: when nothing is trainable.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(module).__name__} has no trainable parameter: check {key}.train/{key}.freeze")
    names = [n for n, _ in trainable]
    members: list[list[nn.Parameter]] = [[] for _ in config.param_groups]
    rest = []
    for i, spec in enumerate(config.param_groups):
        _raise_unmatched(spec.params, _unmatched(names, spec.params), f"{key}.param_groups[{i}].params",
                         "trainable parameter", module)
    for name, param in trainable:
        index = next((i for i, spec in enumerate(config.param_groups)
                      if any(matches(name, p) for p in spec.params)), None)
        (rest if index is None else members[index]).append(param)
    groups = []
    for spec, params in zip(config.param_groups, members):
        if not params:
            raise PatternError(f"{key} param group '{spec.name}' gets no parameter: every match was taken by an "
                               f"earlier group")
        group = {"params": params, "lr": spec.learning_rate(base_lr), "name": spec.name}
        if spec.weight_decay is not None:
            group["weight_decay"] = spec.weight_decay
        groups.append(group)
    if rest:
        groups.append({"params": rest, "lr": base_lr, "name": "default"})
    for g in groups:
        logger.info("param group %s: %d tensors at lr %.3g", g["name"], len(g["params"]), g["lr"])
    return groups
