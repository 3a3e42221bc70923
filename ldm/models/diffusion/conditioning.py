"""How the conditioning reaches the UNet: conditioning keys, the DiffusionWrapper routing, and dropout for
classifier-free guidance.

``conditioning_key`` (the UNet sees, for x [N x C x H x W]):

- None: ``unet(x, t)``;
- concat: ``unet(cat([x] + c_concat, dim=1), t)`` with each map [N x C' x H x W];
- crossattn: ``unet(x, t, context=cat(c_crossattn, dim=1))`` with each context [N x L x D];
- hybrid: both of the above;
- adm: ``unet(x, t, y=c_crossattn[0])`` with a class vector/embedding [N x D].

Conditioning dropout (the rule): with probability ``rate`` per example, the *raw* conditioning input is
replaced by its null input before it is encoded: a caption by the empty string, a class label by the null class
(``null_label``, by default ``n_classes - 1`` of the class embedder), and any other tensor (spatial maps,
precomputed embeddings) by zeros. Sampling builds the unconditional conditioning from the same null input, so
training and guidance agree.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.util import instantiate_from_config


class ConditioningKey(str, enum.Enum):
    CONCAT = "concat"
    CROSSATTN = "crossattn"
    HYBRID = "hybrid"
    ADM = "adm"

    @classmethod
    def parse(cls, value: "str | ConditioningKey | None") -> "ConditioningKey | None":
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown conditioning_key '{value}'; choose one of None, "
                             f"{', '.join(k.value for k in cls)}") from None

    @property
    def wrapper_key(self) -> str:
        """The DiffusionWrapper keyword a single (non-dict) conditioning is passed as."""
        return "c_concat" if self is ConditioningKey.CONCAT else "c_crossattn"


def resolve_conditioning_key(conditioning_key: str | None, concat_mode: bool,
                             cond_stage_config: Any) -> ConditioningKey | None:
    """The effective key of a LatentDiffusion config, with the original's legacy rules.

    No `conditioning_key` means ``concat`` if `concat_mode` else ``crossattn``; an ``__is_unconditional__``
    conditioning stage means no conditioning at all.
    """
    if conditioning_key is None:
        conditioning_key = "concat" if concat_mode else "crossattn"
    if isinstance(cond_stage_config, str) and cond_stage_config == "__is_unconditional__":
        return None
    return ConditioningKey.parse(conditioning_key)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and routes the conditioning to it by ``conditioning_key``.

    :param diff_model_config: the UNet config (``target``/``params``).
    :param conditioning_key: None, concat, crossattn, hybrid or adm.
    """

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.key = ConditioningKey.parse(conditioning_key)

    @property
    def conditioning_key(self) -> str | None:
        """The key as the string the original exposes (``model.conditioning_key``)."""
        return None if self.key is None else self.key.value

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """:param x: an [N x C x H x W] noisy input; :param t: an [N] Tensor of timesteps.
        :return: the UNet output, [N x C_out x H x W]."""
        key = self.key
        if key is None:
            return self.diffusion_model(x, t)
        if key in (ConditioningKey.CONCAT, ConditioningKey.HYBRID):
            _require(c_concat, "c_concat", key)
            x = torch.cat([x, *c_concat], dim=1)
        if key is ConditioningKey.CONCAT:
            return self.diffusion_model(x, t)
        _require(c_crossattn, "c_crossattn", key)
        if key is ConditioningKey.ADM:
            return self.diffusion_model(x, t, y=c_crossattn[0])
        return self.diffusion_model(x, t, context=torch.cat(list(c_crossattn), dim=1))


def _require(value: Sequence[torch.Tensor] | None, name: str, key: ConditioningKey) -> None:
    if not value:
        raise ValueError(f"conditioning_key '{key.value}' needs '{name}' (a list of tensors), got {value!r}")


def as_wrapper_kwargs(cond: Any, key: ConditioningKey | None) -> dict[str, Any]:
    """Turns the conditioning given to ``apply_model`` into DiffusionWrapper keyword arguments.

    A dict (e.g. ``{"c_concat": [...], "c_crossattn": [...]}`` for hybrid) passes through; a tensor or a list
    of tensors goes under ``c_concat`` for concat and ``c_crossattn`` otherwise; None means unconditional.
    """
    if isinstance(cond, Mapping):
        return {k: (v if isinstance(v, (list, tuple)) else [v]) for k, v in cond.items()}
    if cond is None or key is None:
        return {}
    return {key.wrapper_key: list(cond) if isinstance(cond, (list, tuple)) else [cond]}


def is_text(xc: Any) -> bool:
    """Whether a raw conditioning input is a batch of captions (a list or tuple of str)."""
    return isinstance(xc, (list, tuple)) and all(isinstance(s, str) for s in xc)


def null_input(xc: Any, null_label: int | None = None, label_key: str | None = None) -> Any:
    """The null raw conditioning shaped like `xc` (see the module docstring for the rule)."""
    if is_text(xc):
        return [""] * len(xc)
    if isinstance(xc, Mapping):
        if null_label is None:
            raise ValueError("conditioning dropout of class labels needs a null class: set 'ucg_null_label' "
                             "or use a class embedder with 'n_classes'")
        labels = torch.as_tensor(xc[label_key])
        return {**xc, label_key: torch.full_like(labels, null_label)}
    if isinstance(xc, torch.Tensor):
        return torch.zeros_like(xc)
    raise TypeError(f"cannot build a null condition for a raw conditioning of type {type(xc).__name__}")


def drop_conditioning(xc: Any, drop: torch.Tensor, null_label: int | None = None,
                      label_key: str | None = None) -> Any:
    """Replaces the examples of `xc` where `drop` ([N] bool) is set by the null condition."""
    null = null_input(xc, null_label, label_key)
    if is_text(xc):
        return [n if d else s for s, n, d in zip(xc, null, drop.tolist())]
    if isinstance(xc, Mapping):
        labels = torch.as_tensor(xc[label_key])
        keep = ~drop.to(labels.device)
        return {**xc, label_key: torch.where(keep, labels, null[label_key])}
    mask = drop.to(xc.device).reshape(-1, *([1] * (xc.ndim - 1)))
    return torch.where(mask, null, xc)
