"""The fine-tuning sections of a diffusion model's config, applied to the built model: warm start, LoRA, and which
parameters train (with their optimiser groups). ``DiffusionModule`` calls :meth:`FinetuneRecipe.apply` once the
whole model (UNet, first stage, conditioner) is built and then creates its EMA of what trains::

    model:
      params:
        warm_start: {path: logs/<run>/checkpoints/last.ckpt, from_ema: true}
        lora: {rank: 4, targets: [...]}                    # adapters; every other parameter is frozen
        finetune: {train: [...], freeze: [...], param_groups: [...]}

Order: the warm start loads into the plain model (so checkpoint keys match), then the adapters are injected, then
the train/freeze patterns apply (they may also unfreeze parameters next to the adapters).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ldm.finetune.lora import LoraOptions, add_lora, clear_encoder_caches, save_lora
from ldm.finetune.params import FinetuneConfig, apply_freeze, build_param_groups
from ldm.finetune.warm_start import WarmStartConfig, WarmStartReport, warm_start

logger = logging.getLogger(__name__)

LORA_FILE = "lora.safetensors"


@dataclass(frozen=True)
class FinetuneRecipe:
    """The parsed ``warm_start``, ``lora`` and ``finetune`` sections (None where absent)."""

    warm_start: WarmStartConfig | None = None
    lora: LoraOptions | None = None
    finetune: FinetuneConfig | None = None

    @classmethod
    def from_config(cls, warm_start: Mapping[str, Any] | None = None, lora: Mapping[str, Any] | None = None,
                    finetune: Mapping[str, Any] | None = None) -> "FinetuneRecipe":
        """:raises ValueError: naming an unknown or malformed key of any section."""
        return cls(None if warm_start is None else WarmStartConfig.from_config(warm_start),
                   None if lora is None else LoraOptions.from_config(lora),
                   None if finetune is None else FinetuneConfig.from_config(finetune))

    @property
    def active(self) -> bool:
        return any(part is not None for part in (self.warm_start, self.lora, self.finetune))

    def apply(self, module: nn.Module) -> WarmStartReport | None:
        """Warm-starts, adds the adapters and applies the train/freeze patterns to `module`, in that order.

        :return: the warm start's report (None without a warm start).
        :raises PatternError: naming a LoRA target or train/freeze pattern that matches nothing.
        """
        report = warm_start(module, self.warm_start) if self.warm_start is not None else None
        if self.lora is not None:
            add_lora(module, self.lora)
        if self.finetune is not None:
            apply_freeze(module, self.finetune)
        if self.lora is not None or report is not None:
            clear_encoder_caches(module)
        return report

    def param_groups(self, module: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """The optimiser groups of the trainable parameters of `module` (one group at `base_lr` without
        ``finetune.param_groups``)."""
        return build_param_groups(module, self.finetune or FinetuneConfig(), base_lr)

    def save_adapters(self, module: nn.Module, run_dir: str | Path) -> Path | None:
        """Writes the adapter weights of `module` to ``<run_dir>/lora.safetensors`` (None without LoRA)."""
        if self.lora is None:
            return None
        path = Path(run_dir) / LORA_FILE
        save_lora(module, path, self.lora)
        logger.info("saved the LoRA adapters to %s", path)
        return path


def check_trainable_conditioner(module: nn.Module, prefix: str, trainable_flag: bool) -> None:
    """Refuses a recipe that trains parameters under `prefix` (the conditioner) while the model encodes its
    conditioning without gradients.

    :raises ValueError: naming the key ``cond_stage_trainable`` and the first such parameter.
    """
    if trainable_flag:
        return
    trained = [n for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix)]
    if trained:
        raise ValueError(f"the fine-tuning config trains {len(trained)} conditioner parameters (e.g. {trained[0]}) "
                         f"but model.params.cond_stage_trainable is false, so the conditioning is encoded without "
                         f"gradients; set cond_stage_trainable: true")

