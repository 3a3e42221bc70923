"""`SetupCallback`: creates the run's log directory and saves the merged configs into it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

logger = logging.getLogger(__name__)


class SetupCallback(Callback):
    """On rank zero, makes ``<logdir>/{checkpoints,configs}`` and writes ``configs/<now>-project.yaml`` (the merged
    config without its ``lightning`` section) and ``configs/<now>-lightning.yaml`` (that section), which is what
    ``main.py -r <logdir>`` reads back.

    :param resume: the ``-r`` argument ("" when not resuming).
    :param now: the run's time stamp, used in the config file names.
    :param logdir, ckptdir, cfgdir: the run's directories.
    :param config: the merged config, without its ``lightning`` section.
    :param lightning_config: the ``lightning`` section as the trainer used it.
    :param job_marker: a file in which to record the log dir (see :func:`ldm.cli.slurm_job_marker`), or None.
    :param print_config: also log the merged config in full (``main.py --print_config``); otherwise only where it
        was saved.
    """

    def __init__(self, resume: str, now: str, logdir: str, ckptdir: str, cfgdir: str, config: DictConfig,
                 lightning_config: DictConfig, job_marker: str | None = None,
                 print_config: bool = False) -> None:
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = Path(logdir)
        self.ckptdir = Path(ckptdir)
        self.cfgdir = Path(cfgdir)
        self.config = config
        self.lightning_config = lightning_config
        self.job_marker = Path(job_marker) if job_marker else None
        self.print_config = print_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:
            self.write()

    def write(self) -> None:
        """Creates the directories and saves both configs."""
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        callbacks = self.lightning_config.get("callbacks", None) or {}
        if "metrics_over_trainsteps_checkpoint" in callbacks:
            os.makedirs(self.ckptdir / "trainstep_checkpoints", exist_ok=True)
        project = self.cfgdir / f"{self.now}-project.yaml"
        OmegaConf.save(self.config, project)
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       self.cfgdir / f"{self.now}-lightning.yaml")
        if self.print_config:
            logger.info("project config saved to %s:\n%s", project, OmegaConf.to_yaml(self.config))
        else:
            logger.info("configs saved to %s (main.py --print_config prints them)", self.cfgdir)
        if self.job_marker is not None:
            self.job_marker.parent.mkdir(parents=True, exist_ok=True)
            self.job_marker.write_text(f"{self.logdir.resolve()}\n")
