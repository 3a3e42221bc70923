"""The ``lightning.reliability`` section of a config, turned into the plugins and callbacks of a long run.

``main.py`` uses two entry points:

- :func:`reliability_plugins` for ``Trainer(plugins=...)``: an :class:`~ldm.callbacks.checkpoint_io.AtomicCheckpointIO`;
- :func:`reliability_callbacks` for ``Trainer(callbacks=...)``: :class:`~ldm.callbacks.preemption.PreemptionCheckpoint`,
  :class:`~ldm.callbacks.nonfinite.NonFiniteGuard`, :class:`~ldm.callbacks.seeding.StepSeeding` and
  :class:`~ldm.callbacks.data_order.ResumeDataOrder`.

Settings (all optional)::

    lightning:
      reliability:
        export_safetensors: false     # also write <name>.safetensors (the state dict) beside each checkpoint
        max_consecutive_nonfinite: 5  # stop after this many batches in a row whose steps were all skipped
        preemption_signals: [SIGUSR1, SIGTERM]
        slurm_requeue: true           # under SLURM, re-queue the job after a pre-emption checkpoint

The pieces live in one module per concern; their names are re-exported here for code that imported them from this
module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl

from ldm.callbacks.checkpoint_io import AtomicCheckpointIO
from ldm.callbacks.data_order import ResumeDataOrder
from ldm.callbacks.nonfinite import DEFAULT_MAX_CONSECUTIVE_NONFINITE, NonFiniteGuard, NonFiniteTrainingError
from ldm.callbacks.preemption import DEFAULT_SIGNALS, PreemptionCheckpoint, preempted, slurm_requeue_command
from ldm.callbacks.seeding import StepSeeding
from ldm.config_checks import validate_config
from ldm.data.sampler import ResumableSampler

__all__ = ["AtomicCheckpointIO", "NonFiniteGuard", "NonFiniteTrainingError", "PreemptionCheckpoint", "ResumableSampler",
           "ResumeDataOrder", "StepSeeding", "preempted", "reliability_callbacks", "reliability_plugins",
           "reliability_settings", "validate_config"]


def reliability_settings(lightning_config: Any) -> Mapping[str, Any]:
    """The ``reliability`` section of the ``lightning`` part of a config (empty when absent)."""
    value = lightning_config.get("reliability") if hasattr(lightning_config, "get") else None
    return value if value is not None else {}


def reliability_plugins(lightning_config: Any = None) -> list[Any]:
    """Plugins for ``Trainer(plugins=...)``: an :class:`AtomicCheckpointIO` configured from the ``lightning``
    section of the config."""
    settings = reliability_settings(lightning_config)
    return [AtomicCheckpointIO(export_safetensors=bool(settings.get("export_safetensors", False)))]


def reliability_callbacks(lightning_config: Any, ckptdir: str | Path) -> list[pl.Callback]:
    """Callbacks for ``Trainer(callbacks=...)``: pre-emption save to ``<ckptdir>/last.ckpt`` (and a SLURM re-queue),
    the non-finite guard, per-step seeding and the mid-epoch data-order restore (configured from the ``lightning``
    section)."""
    settings = reliability_settings(lightning_config)
    signals = list(settings.get("preemption_signals", DEFAULT_SIGNALS))
    requeue = slurm_requeue_command() if settings.get("slurm_requeue", True) else None
    return [PreemptionCheckpoint(Path(ckptdir) / "last.ckpt", signals=signals, requeue=requeue),
            NonFiniteGuard(settings.get("max_consecutive_nonfinite", DEFAULT_MAX_CONSECUTIVE_NONFINITE)),
            StepSeeding(), ResumeDataOrder()]
