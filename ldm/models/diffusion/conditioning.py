"""The conditioning of a LatentDiffusion, in one place: conditioning keys, the DiffusionWrapper routing, and
:class:`ConditionBuilder`, the one owner that gets the raw condition of a batch, drops it for classifier-free
guidance and builds the null condition (the conditioners themselves only encode).

``conditioning_key`` (the UNet sees, for x [N x C x H x W]):

- None: ``unet(x, t)``;
- concat: ``unet(cat([x] + c_concat, dim=1), t)`` with each map [N x C' x H x W];
- crossattn: ``unet(x, t, context=cat(c_crossattn, dim=1))`` with each context [N x L x D];
- hybrid: both of the above;
- adm: ``unet(x, t, y=c_crossattn[0])`` with a class vector/embedding [N x D].

Conditioning dropout (the rule): with probability ``rate`` per example, the *raw* conditioning input is
replaced by its null input before it is encoded: a caption by the empty string, a class label by the null class
(``null_label``, by default ``n_classes - 1`` of the class embedder), a bounding-box layout (``coordinates_bbox``
tokens) by the empty layout of the model's ``LayoutTokenizer`` (no objects, the whole image), and any other
tensor (spatial maps, precomputed embeddings) by zeros. Sampling builds the unconditional conditioning from the
same null input, so training and guidance agree. One rate applies: the model's ``ucg_rate``, or a class embedder's
own ``ucg_rate`` (SD2-style configs), never both.
"""
from __future__ import annotations

import enum
import logging
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.data.layout import LayoutTokenizer
from ldm.util import ConfigError, instantiate_from_config, parse_enum

logger = logging.getLogger(__name__)

# Conditioning keys whose batch values are passed to the conditioner as they are (not as images).
LAYOUT_COND_KEY = "coordinates_bbox"
RAW_COND_KEYS = ("caption", "txt", LAYOUT_COND_KEY)
TEXT_COND_KEYS = ("caption", "txt")


class ConditioningKey(str, enum.Enum):
    CONCAT = "concat"
    CROSSATTN = "crossattn"
    HYBRID = "hybrid"
    ADM = "adm"

    @classmethod
    def parse(cls, value: "str | ConditioningKey | None") -> "ConditioningKey | None":
        return None if value is None else parse_enum(cls, value, "conditioning_key")

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


def batch_tensor(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """``batch[key]`` ([N x H x W x C] or [N x H x W]) as a contiguous float [N x C x H x W] Tensor."""
    if key not in batch:
        raise KeyError(f"batch has no key '{key}' (keys: {', '.join(map(str, batch))}); check first_stage_key/"
                       f"cond_stage_key in the model config")
    x = torch.as_tensor(batch[key])
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()


def slice_cond(cond: Any, n: int) -> Any:
    """The first `n` examples of a conditioning (tensor, list of tensors, or dict of either)."""
    if cond is None:
        return None
    if isinstance(cond, Mapping):
        return {k: slice_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, list) and cond and isinstance(cond[0], torch.Tensor):
        return [c[:n] for c in cond]
    return cond[:n]


class ConditionBuilder:
    """The one owner of a LatentDiffusion's condition: the raw condition of a batch, its dropout for
    classifier-free guidance, and the null condition. The model encodes what it returns (tau).

    :param cond_stage_key: the batch key of the raw condition (``class_label`` passes the whole batch).
    :param first_stage_key: the image key; a condition with this key is the input image itself.
    :param conditioner: the conditioning stage (read for ``key``, ``n_classes`` and a legacy ``ucg_rate``).
    :param ucg_rate: dropout probability per example; :param null_label: the null class (default
        ``n_classes - 1`` of a class embedder).
    :param concat_mask_key: batch key of an [N x H x W x 1] mask in {0, 1} appended to the encoded condition.
    :param layout_tokenizer: the tokenizer of ``coordinates_bbox`` layouts, whose empty layout is their null
        condition (required with that key).
    """

    def __init__(self, cond_stage_key: str, first_stage_key: str, conditioner: nn.Module | None = None,
                 ucg_rate: float = 0.0, null_label: int | None = None, concat_mask_key: str | None = None,
                 layout_tokenizer: LayoutTokenizer | None = None) -> None:
        if cond_stage_key == LAYOUT_COND_KEY and layout_tokenizer is None:
            raise ValueError(f"cond_stage_key '{LAYOUT_COND_KEY}' needs the layout tokenizer (its empty layout is "
                             f"the null condition)")
        self.layout_tokenizer = layout_tokenizer if cond_stage_key == LAYOUT_COND_KEY else None
        own_rate = float(getattr(conditioner, "ucg_rate", 0.0) or 0.0)
        if own_rate > 0 and ucg_rate > 0:
            raise ConfigError(f"conditioning dropout is set twice: ucg_rate={ucg_rate} and cond_stage_config."
                              f"params.ucg_rate={own_rate}; keep one (the model's ucg_rate)")
        self.ucg_rate = ucg_rate or own_rate
        if not 0.0 <= self.ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {self.ucg_rate}")
        self.cond_stage_key = cond_stage_key
        self.first_stage_key = first_stage_key
        self.label_key = getattr(conditioner, "key", None) or cond_stage_key
        n_classes = getattr(conditioner, "n_classes", None)
        self.null_label = null_label if null_label is not None or n_classes is None else int(n_classes) - 1
        self.class_conditional = n_classes is not None or cond_stage_key == "class_label"
        self.concat_mask_key = concat_mask_key

    def raw(self, batch: Mapping[str, Any], image: torch.Tensor | None, device: torch.device,
            cond_key: str | None = None) -> Any:
        """The raw condition of a batch: captions/boxes as given, the batch for class labels, else an image
        [N x C x H x W] on `device` (`image`, the model input, when the key is the first stage's)."""
        cond_key = cond_key or self.cond_stage_key
        if cond_key == self.first_stage_key:
            return image
        if cond_key == "class_label":
            return batch
        if cond_key not in batch:
            raise KeyError(f"batch has no conditioning key '{cond_key}' (keys: {', '.join(map(str, batch))}); "
                           f"check cond_stage_key in the model config")
        value = batch[cond_key]
        if cond_key in RAW_COND_KEYS or is_text(value):
            return value
        return batch_tensor(batch, cond_key).to(device)

    def drop(self, xc: Any, device: torch.device | None = None) -> Any:
        """`xc` with each example replaced by its null condition with probability ``ucg_rate``."""
        if self.ucg_rate <= 0:
            return xc
        n = len(xc[self.label_key]) if isinstance(xc, Mapping) else len(xc)
        drop = torch.rand(n, device=device) < self.ucg_rate
        if self.layout_tokenizer is not None:
            tokens = torch.as_tensor(xc)
            return torch.where(drop.to(tokens.device)[:, None], self.null(n, device=tokens.device), tokens)
        return drop_conditioning(xc, drop, self.null_label, self.label_key)

    def null(self, n: int, like: Any = None, device: torch.device | None = None) -> Any:
        """The raw null condition of `n` examples, shaped like the raw condition `like` (needed for spatial
        conditions; class labels, captions and layouts need none)."""
        if self.layout_tokenizer is not None:
            return self.layout_tokenizer.null(n).to(device)
        if like is None:
            if self.class_conditional:
                like = {self.label_key: torch.zeros(n, dtype=torch.long, device=device)}
            elif self.cond_stage_key in TEXT_COND_KEYS:
                like = [""] * n
            else:
                raise ValueError(f"cannot infer the null condition of cond_stage_key '{self.cond_stage_key}'; "
                                 f"pass an example raw conditioning as `like`")
        return null_input(slice_cond(like, n), self.null_label, self.label_key)

    def mask_channel(self, batch: Mapping[str, Any], latent: torch.Tensor) -> torch.Tensor | None:
        """The batch's ``concat_mask_key`` mask as [N x 1 x h x w] in {-1, 1} at the size of `latent`
        (the released inpainting model's conditioning), or None without a mask key."""
        if self.concat_mask_key is None:
            return None
        return mask_channel(batch_tensor(batch, self.concat_mask_key)[:latent.shape[0]].to(latent), latent.shape[-2:])


def mask_channel(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """An inpainting mask [N x 1 x H x W] in {0, 1} (1 = to fill) as the released inpainting model's extra
    conditioning channel: mapped to {-1, 1} and resized (nearest) to the latent `size` (h, w)."""
    return torch.nn.functional.interpolate(2.0 * mask - 1.0, size=tuple(size))
