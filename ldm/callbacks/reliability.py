"""Reliability for long runs: crash-safe checkpoint writing, pre-emption signals, non-finite step guards,
exact mid-epoch resume, and config checks that fail before training starts.

``main.py`` uses three entry points:

- :func:`validate_config` after merging the configs and before building anything;
- :func:`reliability_plugins` for ``Trainer(plugins=...)``: an :class:`AtomicCheckpointIO`;
- :func:`reliability_callbacks` for ``Trainer(callbacks=...)``: :class:`PreemptionCheckpoint`,
  :class:`NonFiniteGuard`, :class:`StepSeeding` and :class:`ResumeDataOrder`.

Settings live under ``lightning.reliability`` in the config (all optional)::

    lightning:
      reliability:
        export_safetensors: false     # also write <name>.safetensors (the state dict) beside each checkpoint
        max_consecutive_nonfinite: 5  # stop after this many batches in a row whose steps were all skipped
        preemption_signals: [SIGUSR1, SIGTERM]
"""
from __future__ import annotations

import enum
import errno
import logging
import math
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import RandomSampler

from ldm.checkpoint import atomic_write, load_checkpoint, save_safetensors
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_NONFINITE = 5
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")
NONFINITE_METRIC = "train/nonfinite_skipped"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``<path>.tmp-<pid>``, fsyncs it and renames it over `path`.

    A process killed while saving leaves the previous checkpoint loadable. A disk-full or permission error is
    logged naming the path, the temporary file is removed and the previous checkpoint kept; training goes on
    unless `raise_on_error`. Loading goes through :func:`ldm.checkpoint.load_checkpoint`, which never runs
    code from the file.

    :param export_safetensors: also write the checkpoint's ``state_dict`` as ``<stem>.safetensors`` beside it.
    """

    def __init__(self, export_safetensors: bool = False, raise_on_error: bool = False) -> None:
        super().__init__()
        self.export_safetensors = export_safetensors
        self.raise_on_error = raise_on_error
        self.failed_saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        try:
            with atomic_write(path) as tmp:
                self._write(checkpoint, tmp)
            if self.export_safetensors and "state_dict" in checkpoint:
                save_safetensors(checkpoint["state_dict"], path.with_suffix(".safetensors"))
        except OSError as e:
            self.failed_saves += 1
            reason = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
                      errno.EROFS: "the filesystem is read-only"}.get(e.errno, str(e))
            logger.error("could not save checkpoint %s: %s (%s); the previous checkpoint at that path, if any, "
                         "is kept", path, reason, e)
            if self.raise_on_error:
                raise

    def _write(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        """Writes the checkpoint into the temporary file `tmp` (a hook for tests that slow the write down)."""
        torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location="cpu" if map_location is None else map_location)


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR1/SIGTERM (cluster pre-emption), saves a resumable `ckpt_path` and stops training cleanly.

    The handler only sets a flag; at the next training batch end (after the module's own ``on_train_batch_end``,
    where EMA weights are updated) the trainer saves the checkpoint (with
    optimiser, scheduler and loop state, so ``-r`` resumes it) and ``trainer.should_stop`` ends the run, which
    then exits normally. With several processes the flag is shared, so every rank stops at the same step. The
    handlers are installed when training starts (after Lightning's own) and the previous ones restored after;
    a previous SIGUSR1 handler is still called, a previous SIGTERM handler is not (Lightning's would end the run
    with an error before the checkpoint is written).
    """

    def __init__(self, ckpt_path: str | Path, signals: Sequence[str | int] = DEFAULT_SIGNALS) -> None:
        self.ckpt_path = Path(ckpt_path)
        self.signals = [_signal_number(s) for s in signals]
        self.requested: int | None = None
        self.stopped = False
        self._snapshot: dict[str, Any] | None = None
        self._previous: dict[int, Any] = {}
        self._wrapped: pl.LightningModule | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum
        previous = self._previous.get(signum)
        if signum != signal.SIGTERM and callable(previous):
            previous(signum, frame)  # e.g. SLURM auto-requeue or another checkpoint callback on SIGUSR1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: pre-emption signals will not save a checkpoint")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        # Lightning runs callbacks' on_train_batch_end before the module's, where models update their EMA: save
        # after the module's hook, so that the checkpoint holds the complete state of the step
        module_hook = pl_module.on_train_batch_end

        def on_train_batch_end_then_check(*args: Any, **kwargs: Any) -> None:
            module_hook(*args, **kwargs)
            self._save_if_requested(trainer)

        pl_module.on_train_batch_end = on_train_batch_end_then_check  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _save_if_requested(self, trainer: pl.Trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            return
        name = signal.Signals(self.requested).name if self.requested else "a signal on another rank"
        logger.warning("received %s: saving %s at global step %d and stopping", name, self.ckpt_path,
                       trainer.global_step)
        # kept to write again at the end of training: stopping runs the epoch-end hooks, and a checkpoint callback
        # that saves the same file there would record the interrupted epoch as finished
        self._snapshot = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.save_checkpoint(self._snapshot, self.ckpt_path)
        trainer.strategy.barrier("PreemptionCheckpoint")
        trainer.should_stop = True
        self.requested = None
        self.stopped = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._snapshot is not None:
            trainer.strategy.save_checkpoint(self._snapshot, self.ckpt_path)
            trainer.strategy.barrier("PreemptionCheckpoint")
            self._snapshot = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._wrapped is not None:
            del self._wrapped.on_train_batch_end
            self._wrapped = None


def preempted(trainer: pl.Trainer) -> bool:
    """Whether a :class:`PreemptionCheckpoint` of `trainer` stopped the run on a signal (skip any test run)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.stopped for c in trainer.callbacks)


def _signal_number(sig: str | int) -> int:
    if isinstance(sig, int):
        return sig
    try:
        return int(getattr(signal.Signals, str(sig).upper()))
    except AttributeError:
        raise ConfigError(f"lightning.reliability.preemption_signals: unknown signal {sig!r}") from None


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many steps in a row with a non-finite loss or gradient."""


class NonFiniteGuard(pl.Callback):
    """Skips optimiser steps whose loss or gradients are not finite, counts them, and stops after a streak.

    Before each optimiser step (automatic or manual optimisation: Lightning calls ``on_before_optimizer_step``
    from ``opt.step()`` too), if the last backward's loss or any gradient of the optimiser's parameters is
    NaN/Inf, every gradient is set to None, so the optimiser changes neither weights nor moments. The running
    total is logged as ``train/nonfinite_skipped``. A batch counts as bad when any of its steps was skipped;
    after `max_consecutive` bad batches in a row a :class:`NonFiniteTrainingError` is raised: the weights are
    still those of the last good step, so the exception checkpoint is a good one.
    """

    def __init__(self, max_consecutive: int = DEFAULT_MAX_CONSECUTIVE_NONFINITE) -> None:
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ConfigError(f"lightning.reliability.max_consecutive_nonfinite must be a positive integer, "
                              f"got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.consecutive = 0
        self._loss_finite = True
        self._batch_bad = False
        self._last_bad: list[str] = []
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_bad = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        loss_finite, self._loss_finite = self._loss_finite, True
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            params = []  # fp16 loss scaling: the scaler skips steps with inf gradients itself and lowers its scale
        grads_finite = not params or bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())
        if loss_finite and grads_finite:
            return
        self._last_bad = ["loss"] if not loss_finite else []
        self._last_bad += [self._names.get(id(p), "?") for p in params if not torch.isfinite(p.grad).all()]
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped_total += 1
        self._batch_bad = True
        logger.warning("skipped optimiser step at global step %d: non-finite %s", trainer.global_step,
                       ", ".join(self._last_bad[:8]))
        pl_module.log(NONFINITE_METRIC, float(self.skipped_total), on_step=True, on_epoch=False, prog_bar=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.consecutive = self.consecutive + 1 if self._batch_bad else 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"stopping: {self.consecutive} training batches in a row had a non-finite loss or gradient "
                f"(last at global step {trainer.global_step}: {', '.join(self._last_bad[:8])}); their steps "
                f"were skipped, so the weights are those of the last finite step. Lower the learning rate, "
                f"check the data, or raise lightning.reliability.max_consecutive_nonfinite "
                f"(now {self.max_consecutive}).")

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict.get("skipped_total", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _seed_host_generators(seed: int) -> None:
    """Seeds the CPU generators that data transforms use: torch's default CPU generator, numpy's, random's."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class StepSeeding(pl.Callback):
    """Reseeds the global random generators (torch on every device, numpy, random) before every training batch
    from (seed, global step, rank), so a resumed run draws the same noise, timesteps and dropout masks as an
    uninterrupted one, whatever data loading or validation consumed in between.

    :param seed: the run's seed; by default the one ``seed_everything`` set (``PL_GLOBAL_SEED``).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        step_seed = (base * 1_000_003 + trainer.global_step * 8191 + trainer.global_rank) % (2 ** 32)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed)
        random.seed(step_seed)


class ResumableSampler(RandomSampler):
    """A shuffling sampler whose order depends only on (seed, epoch) and that can skip consumed samples.

    Lightning calls :meth:`set_epoch` at each epoch start; :class:`ResumeDataOrder` calls :meth:`skip` when a
    run resumes in the middle of an epoch, so the resumed run sees exactly the batches the interrupted one
    had not yet seen.

    When the dataset is read in the training process (``num_workers=0``), random transforms draw from the
    global generators; the sampler reseeds them (CPU torch, numpy, random) from (seed, epoch, position) before
    handing out each index, so an item's augmentation does not depend on when it was fetched, and a resumed
    run fetches the same augmented batches as an uninterrupted one.

    :param length: the dataset length.
    :param seed_transforms: reseed the global generators per position as described above.
    """

    def __init__(self, length: int, seed: int = 0, seed_transforms: bool = True) -> None:
        super().__init__(range(int(length)))
        self.length = int(length)
        self.seed = int(seed)
        self.seed_transforms = seed_transforms
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, n: int) -> None:
        """The next iteration starts after the first `n` indices of the current epoch's order."""
        self._skip = int(n)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        start, self._skip = self._skip, 0
        for position in range(start, self.length):
            if self.seed_transforms:
                _seed_host_generators((self.seed * 1_000_003 + self.epoch * 65_537 + position) % (2 ** 32))
            yield order[position]

    def __len__(self) -> int:
        return self.length


class ResumeDataOrder(pl.Callback):
    """On a mid-epoch resume, makes :class:`ResumableSampler` skip the samples consumed before the interruption.

    Lightning restores the batch counter of the interrupted epoch but starts the epoch's data iterator from
    the beginning; without this the resumed run would see the epoch's first batches twice.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # as restored from the checkpoint: batches of the interrupted epoch whose step was taken ("completed"
        # lags by one when the checkpoint was written at a batch end)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = trainer.fit_loop.epoch_progress.current
        if done <= 0 or done >= trainer.num_training_batches or epoch.processed > epoch.completed:
            return  # nothing consumed, or the checkpoint was written at an epoch end: the next epoch starts afresh
        loader = trainer.train_dataloader
        sampler = _find_sampler(loader)
        if sampler is None:
            logger.warning("resuming in the middle of an epoch (%d batches done) with a sampler that cannot skip "
                           "them; the data order of this epoch will differ from an uninterrupted run", done)
            return
        batch_size = getattr(loader, "batch_size", None) or 1
        sampler.skip(done * batch_size)


def _find_sampler(loader: Any) -> ResumableSampler | None:
    for obj in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(obj, ResumableSampler):
            return obj
    return None


def _section(config: Any, key: str) -> Mapping[str, Any]:
    value = config.get(key) if config is not None and hasattr(config, "get") else None
    return value if value is not None else {}


def reliability_settings(lightning_config: Any) -> Mapping[str, Any]:
    """The ``reliability`` section of the ``lightning`` part of a config (empty when absent)."""
    return _section(lightning_config, "reliability")


def reliability_plugins(lightning_config: Any = None) -> list[Any]:
    """Plugins for ``Trainer(plugins=...)``: an :class:`AtomicCheckpointIO` configured from the ``lightning``
    section of the config."""
    settings = reliability_settings(lightning_config)
    return [AtomicCheckpointIO(export_safetensors=bool(settings.get("export_safetensors", False)))]


def reliability_callbacks(lightning_config: Any, ckptdir: str | Path) -> list[pl.Callback]:
    """Callbacks for ``Trainer(callbacks=...)``: pre-emption save to ``<ckptdir>/last.ckpt``, the non-finite
    guard, per-step seeding and the mid-epoch data-order restore (configured from the ``lightning`` section)."""
    settings = reliability_settings(lightning_config)
    signals = list(settings.get("preemption_signals", DEFAULT_SIGNALS))
    return [PreemptionCheckpoint(Path(ckptdir) / "last.ckpt", signals=signals),
            NonFiniteGuard(settings.get("max_consecutive_nonfinite", DEFAULT_MAX_CONSECUTIVE_NONFINITE)),
            StepSeeding(), ResumeDataOrder()]


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
