"""`PreemptionCheckpoint`: on SIGUSR1/SIGTERM (a cluster about to pre-empt the job), save a resumable checkpoint
at the end of the current step, stop cleanly, and (under SLURM) put the job back in the queue."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR1/SIGTERM, saves a resumable `ckpt_path` at the end of the current step and stops training cleanly.

    The handler only sets a flag; at the next training batch end (after the module's own ``on_train_batch_end``,
    where EMA weights are updated) every rank learns whether any rank got the signal, and all of them save through
    ``trainer.save_checkpoint`` (with optimiser, scheduler and loop state, so ``-r`` resumes it); then
    ``trainer.should_stop`` ends the run, which exits normally. So with several processes every rank stops at the
    same step, whichever rank the signal reached. The same signal a second time before the save ends the process
    (a run stuck in a collective never reaches the end of its step). The handlers are installed when training
    starts (after Lightning's own) and the previous ones restored after; a previous SIGUSR1 handler is still called,
    a previous SIGTERM handler is not (Lightning's would end the run with an error before the checkpoint is
    written).

    :param ckpt_path: where to save (the run's ``last.ckpt``, which ``main.py -r <logdir>`` resumes).
    :param signals: the signals to handle (names or numbers).
    :param requeue: a command that rank zero runs after the checkpoint is saved when the signal it got was SIGUSR1
        (the signal a cluster sends ahead of a time limit; SIGTERM also comes from a user cancelling the job), e.g.
        ``["scontrol", "requeue", "<job id>"]`` (see :func:`slurm_requeue_command`); None for none.
    """

    def __init__(self, ckpt_path: str | Path, signals: Sequence[str | int] = DEFAULT_SIGNALS,
                 requeue: Sequence[str] | None = None) -> None:
        self.ckpt_path = Path(ckpt_path)
        self.signals = [signal_number(s) for s in signals]
        self.requeue = list(requeue) if requeue else None
        self.requested: int | None = None
        self.stopped = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._wrapped: pl.LightningModule | None = None

    @property
    def snapshot_path(self) -> Path:
        """A second name of the saved checkpoint, kept until training ends (see :meth:`on_train_end`)."""
        return self.ckpt_path.with_name(self.ckpt_path.name + ".preempted")

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested == signum:  # the same signal again before the save: the run may be stuck, so end it
            logger.error("received %s again before the checkpoint could be saved: ending the process",
                         signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum
        previous = self._previous.get(signum)
        if signum != signal.SIGTERM and callable(previous):
            previous(signum, frame)  # e.g. another checkpoint callback on SIGUSR1

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
        trainer.save_checkpoint(self.ckpt_path)
        if trainer.is_global_zero:
            # stopping runs the epoch-end hooks, and a checkpoint callback that saves the same file there would
            # record the interrupted epoch as finished: keep a second name of this file to put back at the end
            # (checkpoints are written by rename, so a later save replaces the name, not this file's contents)
            _link_or_copy(self.ckpt_path, self.snapshot_path)
        trainer.should_stop = True
        self.received, self.requested = self.requested, None
        self.stopped = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.stopped:
            return
        if trainer.is_global_zero and self.snapshot_path.exists():
            if self.ckpt_path.exists() and os.path.samefile(self.snapshot_path, self.ckpt_path):
                self.snapshot_path.unlink()  # nothing saved over it (and a rename onto itself does nothing)
            else:
                os.replace(self.snapshot_path, self.ckpt_path)
            if self.requeue and self.received == signal.SIGUSR1:
                requeue_job(self.requeue)
        trainer.strategy.barrier("PreemptionCheckpoint")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self._wrapped is not None:
            del self._wrapped.on_train_batch_end
            self._wrapped = None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def preempted(trainer: pl.Trainer) -> bool:
    """Whether a :class:`PreemptionCheckpoint` of `trainer` stopped the run on a signal (skip any test run)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.stopped for c in trainer.callbacks)


def signal_number(sig: str | int) -> int:
    """The number of a signal given by name (``"SIGUSR1"``, any case) or number.

    :raises ConfigError: naming ``lightning.reliability.preemption_signals`` for an unknown name.
    """
    if isinstance(sig, int):
        return sig
    try:
        return int(getattr(signal.Signals, str(sig).upper()))
    except AttributeError:
        raise ConfigError(f"lightning.reliability.preemption_signals: unknown signal {sig!r}") from None


def slurm_requeue_command(environ: dict[str, str] | None = None) -> list[str] | None:
    """``scontrol requeue <job>`` for the SLURM job this process runs in (array jobs: ``<array job>_<task>``), or
    None outside SLURM."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return ["scontrol", "requeue", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"]
    if env.get("SLURM_JOB_ID"):
        return ["scontrol", "requeue", env["SLURM_JOB_ID"]]
    return None


def requeue_job(command: Sequence[str]) -> bool:
    """Runs the re-queue `command`; logs and returns whether it succeeded (a failure does not raise: the checkpoint
    is saved, and the job can be resubmitted by hand with ``-r``)."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        logger.error("could not re-queue the job with %s: %s; resubmit it with -r <logdir>", " ".join(command), e)
        return False
    if result.returncode != 0:
        logger.error("re-queue command %s failed (exit %d): %s; resubmit the job with -r <logdir>",
                     " ".join(command), result.returncode, result.stderr.strip())
        return False
    logger.warning("re-queued the job: %s", " ".join(command))
    return True
