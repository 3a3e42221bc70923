"""Speed and memory options of training, chosen in a config's ``model.performance`` section.

    model:
      target: ldm.models.diffusion.ddpm.LatentDiffusion
      performance:
        compile: true                   # torch.compile the UNet (and the first stage's encoder/decoder);
                                        # or torch.compile's arguments, e.g. {mode: max-autotune, dynamic: false}
        channels_last: true             # NHWC weights and feature maps
        activation_checkpointing: true  # recompute each UNet block in the backward pass (non-reentrant)
        fused_adamw: true               # the fused AdamW kernel where the parameters' device has one
        tf32: true                      # TensorFloat-32 matmuls on GPUs that have it (compute capability >= 8)
      params: ...
    lightning:
      trainer:
        precision: bf16-mixed           # mixed precision is Lightning's `precision` (bf16-mixed, 16-mixed)

Every option is off when absent, so a config without the section trains exactly as before;
``activation_checkpointing`` absent keeps ``unet_config.params.use_checkpoint`` (which means the same thing).
``main.py`` applies the section with :func:`apply_performance_options` once the model is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetTrunk
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

CONFIG_KEY = "model.performance"
# devices whose AdamW has a fused kernel (torch >= 2.4 for cpu)
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps", "xpu")
COMPILE_ARGUMENTS = ("mode", "backend", "dynamic", "fullgraph", "options")


@dataclasses.dataclass(frozen=True)
class PerformanceOptions:
    """The ``model.performance`` section of a config (see the module docstring)."""

    compile: bool | Mapping[str, Any] = False
    compile_first_stage: bool | None = None  # None or true: with `compile`, also the first stage
    channels_last: bool = False
    activation_checkpointing: bool | None = None  # None: as the network configs say (use_checkpoint)
    fused_adamw: bool = False
    tf32: bool = False

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> PerformanceOptions:
        """Validated options from a config section; raises ConfigError naming an unknown or ill-typed key."""
        section = dict(section or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in section.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                extra = " Mixed precision is lightning.trainer.precision (e.g. bf16-mixed)." \
                    if key == "precision" else ""
                raise ConfigError(f"unknown key '{CONFIG_KEY}.{key}'{hint}; valid keys: {', '.join(fields)}.{extra}")
            if key == "compile" and isinstance(value, Mapping):
                unknown = [k for k in value if k not in COMPILE_ARGUMENTS]
                if unknown:
                    raise ConfigError(f"unknown key '{CONFIG_KEY}.compile.{unknown[0]}'; torch.compile arguments "
                                      f"accepted here: {', '.join(COMPILE_ARGUMENTS)}")
                section[key] = dict(value)
            elif not (isinstance(value, bool) or (value is None and fields[key].default is None)):
                raise ConfigError(f"'{CONFIG_KEY}.{key}' must be true or false, got {value!r}")
        return cls(**section)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switches activation checkpointing of every UNet and first-stage encoder/decoder inside `model` whose
    parameters train; returns how many networks it set."""
    count = 0
    for module in model.modules():
        if not isinstance(module, (UNetTrunk, Encoder, Decoder)):
            continue
        if not any(p.requires_grad for p in module.parameters()):
            continue
        if isinstance(module, UNetTrunk):
            module.set_activation_checkpointing(enabled)
        else:
            module.use_checkpoint = enabled
        count += 1
    return count


def _channels_last_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: 4-D Tensor arguments ([N x C x H x W]) in channels-last layout."""
    args = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4
                 else a for a in args)
    return args, kwargs


def use_channels_last(model: nn.Module) -> list[nn.Module]:
    """Converts the 4-D weights of `model` to channels-last and makes its convolutional networks (UNets,
    first-stage encoders/decoders) take their inputs in that layout; returns those networks."""
    model.to(memory_format=torch.channels_last)
    networks = [m for m in model.modules() if isinstance(m, (UNetTrunk, Encoder, Decoder))]
    for net in networks:
        net.register_forward_pre_hook(_channels_last_inputs, with_kwargs=True)
    return networks


# inductor's layout optimisation turns the feature maps of convolution-heavy graphs channels-last. On CPU it made the
# compiled training step (forward and backward) slower and the compiled inference faster (demo UNet, one thread,
# scripts/benchmark.py --compare compile): training at batch 4 0.76x eager with it, 1.09x without; at batch 32
# 1.02x with, 1.09x without; guided sampling at batch 4 1.26x with, 1.10x without. So it is off on CPU for the
# networks that train and left to inductor for the frozen ones.
CPU_TRAINING_INDUCTOR_OPTIONS = {"layout_optimization": False}


def compile_arguments(kwargs: Mapping[str, Any], network: nn.Module, device_type: str) -> dict[str, Any]:
    """``torch.compile``'s arguments for `network`, which runs on `device_type`: `kwargs` as given, plus, when
    the network trains (has parameters that require gradients) on CPU with the inductor backend, ``options=
    CPU_TRAINING_INDUCTOR_OPTIONS`` unless `kwargs` chooses a ``mode`` or ``options`` itself (torch.compile takes
    one or the other)."""
    kwargs = dict(kwargs)
    inductor = kwargs.get("backend", "inductor") == "inductor"
    trains = any(p.requires_grad for p in network.parameters())
    if device_type == "cpu" and trains and inductor and "mode" not in kwargs and "options" not in kwargs:
        kwargs["options"] = dict(CPU_TRAINING_INDUCTOR_OPTIONS)
    return kwargs


def compile_networks(model: nn.Module, kwargs: Mapping[str, Any], first_stage: bool, device_type: str) -> list[str]:
    """``torch.compile`` in place (``nn.Module.compile``: state-dict keys stay as they are) of the UNets in `model`
    and, with `first_stage`, of the first stage's encoder and decoder, with `kwargs` as :func:`compile_arguments`
    completes them for `device_type`; returns what it compiled."""
    compiled = []
    for name, module in model.named_modules():
        is_first_stage = name.startswith("first_stage_model.") and isinstance(module, (Encoder, Decoder))
        if isinstance(module, UNetTrunk) or (first_stage and is_first_stage):
            module.compile(**compile_arguments(kwargs, module, device_type))
            compiled.append(name or type(module).__name__)
    return compiled


def enable_tf32() -> bool:
    """TensorFloat-32 for float32 matmuls and convolutions on a CUDA GPU of compute capability >= 8; returns
    whether it was enabled (False without such a GPU)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")  # convolutions already allow TF32 by default (cudnn.allow_tf32)
    return True


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether the fused AdamW kernel can update all of `params` (floating point, on a device that has it)."""
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)


def optimizer_options(model: nn.Module, params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Extra keyword arguments for the AdamW of `model` over `params`: ``fused=True`` when the model's
    performance options ask for it and the parameters' device has the kernel, else none."""
    options = getattr(model, "performance_options", None)
    if options is None or not options.fused_adamw:
        return {}
    if not fused_adamw_supported(params):
        logger.info("fused AdamW is not available for these parameters; using the default implementation")
        return {}
    return {"fused": True}


def apply_performance_options(model: nn.Module, section: Mapping[str, Any] | None,
                              device_type: str | None = None) -> PerformanceOptions:
    """Applies a config's ``model.performance`` section to a built `model` (a LatentDiffusion, DDPM or
    autoencoder) that will run on `device_type` (default: ``cuda`` when a GPU is present, else ``cpu``); stores
    the options as ``model.performance_options`` for ``configure_optimizers``."""
    options = PerformanceOptions.from_config(section)
    model.performance_options = options
    applied = []
    if options.activation_checkpointing is not None:
        count = set_activation_checkpointing(model, options.activation_checkpointing)
        applied.append(f"activation checkpointing {'on' if options.activation_checkpointing else 'off'} "
                       f"in {count} network(s)")
    if options.channels_last:
        applied.append(f"channels-last in {len(use_channels_last(model))} network(s)")
    if options.compile is not False:
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = options.compile if isinstance(options.compile, Mapping) else {}
        first_stage = options.compile_first_stage is not False
        applied.append(f"torch.compile of {', '.join(compile_networks(model, kwargs, first_stage, device_type))}")
    if options.tf32:
        applied.append("TF32" if enable_tf32() else "TF32 requested, but no CUDA GPU with TF32 is present")
    if options.fused_adamw:
        applied.append("fused AdamW where available")
    if applied:
        logger.info("performance options: %s", "; ".join(applied))
    return options
