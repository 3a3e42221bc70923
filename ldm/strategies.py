"""How a run is spread over processes: the Lightning strategy, devices and cluster environment that a config asks
for, checked before any process starts, and the FSDP strategy for latent diffusion models.

Lightning's strategies do all process work (``ddp``: one process per device, started by Lightning's launcher,
``torchrun`` or ``srun``; ``fsdp``: the same, with the UNet sharded). :func:`distributed_arguments` turns the
translated ``lightning.trainer`` arguments into the final ones:

- a strategy name Lightning does not know, ``--gpus``/``devices`` naming GPUs this machine does not have, FSDP for a
  model it cannot wrap, and devices or nodes that contradict the ``torchrun``/SLURM launch fail with a
  :class:`~ldm.util.ConfigError` naming the key and the valid choices;
- under ``torchrun`` or ``srun`` the devices and nodes default to what the launcher started, with DDP;
- on several GPUs ``sync_batchnorm`` defaults on (the discriminator's BatchNorm then normalises with the statistics
  of the global batch, as one process would);
- ``strategy: fsdp`` becomes a :class:`UNetFSDPStrategy` built for the model (see there);
- under SLURM, Lightning's own re-queue on SIGUSR1 is switched off when ``lightning.reliability.slurm_requeue`` (on
  by default) lets :class:`~ldm.callbacks.preemption.PreemptionCheckpoint` save at a step end and re-queue.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any, Mapping

import torch
from pytorch_lightning.strategies import FSDPStrategy, StrategyRegistry
from torch import nn

from ldm.cli import device_count
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

FSDP_NAMES = ("fsdp", "fsdp_cpu_offload")
# the ``lightning.fsdp`` keys and what they become
FSDP_OPTIONS = ("activation_checkpointing", "sharding_strategy", "cpu_offload")
# HYBRID_SHARD needs a device mesh, which a config cannot give
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def valid_strategies() -> list[str]:
    """The strategy names Lightning accepts (``auto`` and its registry)."""
    return ["auto", *StrategyRegistry.available_strategies()]


def check_strategy(name: Any) -> None:
    """:raises ConfigError: naming ``lightning.trainer.strategy`` when `name` is not a strategy Lightning knows."""
    if not isinstance(name, str) or name in valid_strategies():
        return
    close = difflib.get_close_matches(name, valid_strategies(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"lightning.trainer.strategy: unknown strategy '{name}'{hint}; choose one of: "
                      f"{', '.join(valid_strategies())}")


def check_devices(accelerator: Any, devices: Any, key: str, available: int | None = None) -> None:
    """Checks that GPU `devices` (a count, a list of indices, or "auto"/-1) exist on this machine.

    :param key: the setting the devices came from (``--gpus`` or ``lightning.trainer.devices``), for the message.
    :param available: the number of GPUs (default: ``torch.cuda.device_count()``).
    :raises ConfigError: naming `key`, what exists, and how to train on CPU processes instead.
    """
    if accelerator not in ("gpu", "cuda") or devices in (None, "auto", -1, "-1"):
        return
    available = torch.cuda.device_count() if available is None else available
    cpu_hint = "lightning.trainer.accelerator=cpu lightning.trainer.devices=N runs N CPU processes instead"
    if available == 0:
        raise ConfigError(f"{key}={devices}: this machine has no GPU (torch.cuda.device_count() is 0); {cpu_hint}")
    indices = list(devices) if isinstance(devices, (list, tuple)) else None
    if indices is None and isinstance(devices, str) and "," in devices:
        indices = [int(i) for i in devices.split(",") if i.strip()]
    valid = f"valid GPU indices are 0..{available - 1}" if available > 1 else "the valid GPU index is 0"
    if indices is not None:
        missing = [i for i in indices if not 0 <= int(i) < available]
        if missing:
            raise ConfigError(f"{key}={devices}: no GPU {', '.join(map(str, missing))} on this machine; {valid} "
                              f"({available} GPUs)")
    elif device_count(devices, available=available) > available:
        raise ConfigError(f"{key}={devices}: asks for {device_count(devices, available=available)} GPUs but this "
                          f"machine has {available}; {valid}")


def launcher_processes(environ: Mapping[str, str] | None = None) -> tuple[str, int, int] | None:
    """(launcher, processes per node, nodes) when this process was started by ``torchrun`` or ``srun`` as one of
    several, else None."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        return ("torchrun", local, max(1, world // max(1, local))) if world > 1 else None
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        ntasks = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        given = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", ""))
        per_node = int(given.group()) if given else max(1, ntasks // nodes)
        return ("srun", per_node, nodes) if ntasks > 1 else None
    return None


def apply_launcher(kwargs: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Devices and nodes from the ``torchrun``/``srun`` launch when the config leaves them open (one device, one
    node), with ``strategy: ddp`` unless one is set.

    :raises ConfigError: naming ``lightning.trainer.devices``/``num_nodes`` when they contradict the launch.
    """
    launch = launcher_processes(environ)
    if launch is None:
        return kwargs
    launcher, per_node, nodes = launch
    kwargs = dict(kwargs)
    requested = device_count(kwargs.get("devices"), available=per_node)
    if requested == 1 and per_node > 1:
        kwargs["devices"] = per_node if kwargs.get("accelerator") == "cpu" else _same_kind(kwargs.get("devices"),
                                                                                             per_node)
    elif requested != per_node:
        raise ConfigError(f"lightning.trainer.devices={kwargs.get('devices')} ({requested} per node) contradicts "
                          f"the {launcher} launch, which started {per_node} processes per node; set it to "
                          f"{per_node} (one process per device)")
    if int(kwargs.get("num_nodes", 1)) == 1 and nodes > 1:
        kwargs["num_nodes"] = nodes
    elif int(kwargs.get("num_nodes", 1)) != nodes:
        raise ConfigError(f"lightning.trainer.num_nodes={kwargs['num_nodes']} contradicts the {launcher} launch on "
                          f"{nodes} node(s)")
    if kwargs.get("strategy", "auto") == "auto":
        kwargs["strategy"] = "ddp"
    logger.info("started by %s: %d process(es) per node on %d node(s)", launcher, per_node, nodes)
    return kwargs


def _same_kind(devices: Any, count: int) -> Any:
    return count if not isinstance(devices, (list, tuple)) else list(range(count))


def world_size_of(kwargs: Mapping[str, Any]) -> int:
    """The number of processes that trainer arguments ask for (devices x nodes; "auto" counts as one)."""
    devices = kwargs.get("devices")
    per_node = 1 if devices in ("auto", None) else device_count(devices, available=max(1, torch.cuda.device_count()))
    return per_node * int(kwargs.get("num_nodes", 1))


def distributed_arguments(kwargs: dict[str, Any], model: nn.Module, lightning_config: Any = None,
                          devices_key: str = "lightning.trainer.devices",
                          environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The final Trainer arguments for `model` (see the module docstring).

    :param kwargs: translated ``lightning.trainer`` arguments (see :func:`ldm.cli.trainer_arguments`).
    :param lightning_config: the ``lightning`` section (for ``fsdp`` and ``reliability`` settings).
    :param devices_key: the setting the devices came from, for messages.
    :raises ConfigError: see the module docstring.
    """
    settings = lightning_config if lightning_config is not None and hasattr(lightning_config, "get") else {}
    kwargs = dict(kwargs)
    strategy = kwargs.get("strategy", "auto")
    check_strategy(strategy)
    check_devices(kwargs.get("accelerator"), kwargs.get("devices"), devices_key)
    kwargs = apply_launcher(kwargs, environ)
    strategy = kwargs.get("strategy", "auto")
    if (kwargs.get("accelerator") in ("gpu", "cuda") and world_size_of(kwargs) > 1
            and "sync_batchnorm" not in kwargs and strategy not in FSDP_NAMES):
        kwargs["sync_batchnorm"] = True
        logger.info("several GPUs: sync_batchnorm on (BatchNorm layers use the statistics of the global batch); "
                    "set lightning.trainer.sync_batchnorm: false to keep per-device statistics")
    fsdp_settings = settings.get("fsdp", None) or {}
    if isinstance(strategy, str) and strategy in FSDP_NAMES:
        kwargs["strategy"] = UNetFSDPStrategy.for_model(model, cpu_offload=strategy == "fsdp_cpu_offload",
                                                        **dict(fsdp_settings))
    elif fsdp_settings:
        raise ConfigError(f"lightning.fsdp is set but lightning.trainer.strategy is '{strategy}'; the fsdp settings "
                          f"apply only to strategy: fsdp")
    reliability = settings.get("reliability", None) or {}
    if launcher_processes(environ) is not None and launcher_processes(environ)[0] == "srun" and reliability.get(
            "slurm_requeue", True):
        from lightning_fabric.plugins.environments import SLURMEnvironment

        kwargs["plugins"] = [*(kwargs.get("plugins") or []), SLURMEnvironment(auto_requeue=False)]
    return kwargs


def unet_blocks(model: nn.Module) -> list[type[nn.Module]]:
    """The UNet block classes of `model` that FSDP wraps one by one (the UNet's ``TimestepEmbedSequential``
    blocks: every input block, the middle block and every output block); empty when it has no UNet."""
    from ldm.modules.diffusionmodules.unet_blocks import TimestepEmbedSequential

    network = getattr(getattr(model, "model", None), "diffusion_model", None)
    if network is None or not any(isinstance(m, TimestepEmbedSequential) for m in network.modules()):
        return []
    return [TimestepEmbedSequential]


def check_fsdp_model(model: nn.Module) -> None:
    """:raises ConfigError: naming the key when FSDP cannot train `model`."""
    name = type(model).__name__
    if not unet_blocks(model):
        raise ConfigError(f"lightning.trainer.strategy: fsdp shards the UNet of a diffusion model "
                          f"(model.model.diffusion_model), and {name} has none; for this model choose ddp (or "
                          f"another of: {', '.join(s for s in valid_strategies() if s not in FSDP_NAMES)})")
    if not getattr(model, "automatic_optimization", True):
        raise ConfigError(f"lightning.trainer.strategy: fsdp cannot train {name}, which steps its optimisers by "
                          f"hand; choose ddp")
    if getattr(model, "use_ema", False):
        raise ConfigError("model.params.use_ema: with lightning.trainer.strategy: fsdp the UNet's parameters are "
                          "sharded over the ranks, and the EMA keeps a full copy that it updates from them; set "
                          "model.params.use_ema: false, or train with ddp")


class UNetFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP for a latent diffusion model: each UNet block (``TimestepEmbedSequential``) is its own FSDP
    unit, the rest of the trainable modules (time and class embeddings, the output layer, a trainable conditioner)
    form the root unit, and the frozen first stage and conditioner are left out of FSDP (every rank keeps them
    whole: they are small, need no gradients, and ``scale_by_std`` and image logging use them outside the training
    step). Mixed precision comes from the trainer's ``precision`` (e.g. ``bf16-mixed``), as in Lightning.
    Checkpoints hold the full state dict with the model's own keys (``state_dict_type="full"``), so they load with
    ``strict=True`` into a model in one process.

    Lightning refuses ``strategy="fsdp"`` on the CPU accelerator, and on CPU its FSDP set-up gives torch no device
    (which torch rejects: "FSDP needs a non-CPU accelerator device"); this strategy passes the CPU device to torch,
    so FSDP also runs on CPU processes (gloo), which the tests use.

    :param ignored: modules FSDP leaves alone (moved to the process's device as they are).
    :param activation_checkpointing: recompute each block's activations in the backward pass.
    """

    def __init__(self, blocks: list[type[nn.Module]], ignored: list[nn.Module] = (),
                 activation_checkpointing: bool = False, **kwargs: Any) -> None:
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if activation_checkpointing:
            kwargs["activation_checkpointing_policy"] = ModuleWrapPolicy(set(blocks))
        super().__init__(auto_wrap_policy=ModuleWrapPolicy(set(blocks)), state_dict_type="full",
                         ignored_modules=list(ignored), **kwargs)
        self._ignored = list(ignored)

    @classmethod
    def for_model(cls, model: nn.Module, activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD",
                  cpu_offload: bool = False, **unknown: Any) -> UNetFSDPStrategy:
        """The strategy for `model` with the ``lightning.fsdp`` settings.

        :raises ConfigError: naming an unknown ``lightning.fsdp`` key, or the reason FSDP cannot train `model`.
        """
        if unknown:
            raise ConfigError(f"unknown lightning.fsdp key(s): {', '.join(unknown)}; valid: {', '.join(FSDP_OPTIONS)}")
        if str(sharding_strategy).upper() not in SHARDING_STRATEGIES:
            raise ConfigError(f"lightning.fsdp.sharding_strategy: unknown '{sharding_strategy}'; choose one of: "
                              f"{', '.join(SHARDING_STRATEGIES)}")
        check_fsdp_model(model)
        frozen = []
        for name in ("first_stage_model", "cond_stage_model"):
            module = getattr(model, name, None)
            if isinstance(module, nn.Module) and not any(p.requires_grad for p in module.parameters()):
                if all(module is not m for m in frozen):
                    frozen.append(module)
        return cls(unet_blocks(model), ignored=frozen, activation_checkpointing=activation_checkpointing,
                   sharding_strategy=str(sharding_strategy).upper(), cpu_offload=cpu_offload)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        for module in self._ignored:
            module.to(self.root_device)
        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel)
                                                      for m in model.modules()):
            # wrap here with the CPU device; Lightning's set-up then only adds activation checkpointing
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                             **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)
        return super()._setup_model(model)
