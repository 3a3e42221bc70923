"""The training entry point behind ``python main.py``: configs -> model, data, trainer -> fit / test."""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import SetupCallback
from ldm.callbacks.preemption import preempted
from ldm.callbacks.reliability import reliability_callbacks, reliability_plugins
from ldm.checkpoint import CheckpointError
from ldm.cli import (RunPaths, merge_configs, parse_cli, resolve_run, scaled_learning_rate, split_cli_args,
                     trainer_arguments)
from ldm.config_checks import validate_config
from ldm.known_warnings import silence_known_warnings
from ldm.performance import apply_performance_options
from ldm.strategies import check_strategy, distributed_arguments
from ldm.util import ConfigError, as_list, config_source, instantiate_from_config

logger = logging.getLogger("main")

RUN_TIME_ENV = "LDM_RUN_TIME"

DEFAULT_LOGGERS = {
    "pytorch_lightning.loggers.CSVLogger": {"name": "csv"},
    "pytorch_lightning.loggers.TensorBoardLogger": {"name": "tensorboard"},
    "pytorch_lightning.loggers.WandbLogger": {"name": None, "id": None, "offline": False},
}


def logger_config(lightning_config: DictConfig, run: RunPaths, debug: bool) -> DictConfig:
    """``lightning.logger`` over the defaults for its target (CSV when none is given), saving into the run."""
    user = lightning_config.get("logger", None) or OmegaConf.create()
    target = user.get("target", "pytorch_lightning.loggers.CSVLogger")
    params = dict(DEFAULT_LOGGERS.get(target, {}))
    if target.endswith("WandbLogger"):
        params.update(name=run.nowname, id=run.nowname, offline=debug)
    default = {"target": target, "params": {"save_dir": str(run.logdir), **params}}
    return OmegaConf.merge(default, user)


def checkpoint_config(lightning_config: DictConfig, run: RunPaths, model: Any) -> DictConfig:
    """``lightning.modelcheckpoint`` over the default: last.ckpt plus the top 3 on the model's `monitor`."""
    # no version counter: last.ckpt is overwritten even when another callback (the emergency save) wrote it
    params: dict[str, Any] = {"dirpath": str(run.ckptdir), "filename": "{epoch:06}", "verbose": True,
                              "save_last": True, "enable_version_counter": False}
    monitor = getattr(model, "monitor", None)
    if monitor:
        logger.info("monitoring %s as checkpoint metric", monitor)
        params.update(monitor=monitor, save_top_k=3)
    default = {"target": "pytorch_lightning.callbacks.ModelCheckpoint", "params": params}
    return OmegaConf.merge(default, lightning_config.get("modelcheckpoint", None) or {})


def callbacks_config(lightning_config: DictConfig, run: RunPaths, model: Any) -> DictConfig:
    """``lightning.callbacks`` merged over the default callbacks (which a config can re-parameterise by name, or
    switch off by setting the name to null)."""
    defaults: dict[str, Any] = {
        "image_logger": {"target": "ldm.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "checkpoint_callback": checkpoint_config(lightning_config, run, model),
        "emergency_checkpoint": {"target": "ldm.callbacks.EmergencyCheckpoint",
                                 "params": {"ckptdir": str(run.ckptdir)}},
    }
    user = lightning_config.get("callbacks", None) or OmegaConf.create()
    if "metrics_over_trainsteps_checkpoint" in user:
        defaults["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": str(run.ckptdir / "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000,
                       "save_weights_only": True}}
    return OmegaConf.merge(defaults, user)


def configure_learning_rate(model: Any, config: DictConfig, trainer: pl.Trainer, scale: bool) -> float:
    """Sets ``model.learning_rate`` from ``model.base_learning_rate`` by the original's rule, with the devices,
    nodes and gradient accumulation of `trainer` (so the world size is the one the run uses, including under
    torchrun and SLURM); logs the rule and the world size."""
    base_lr = config.model.get("base_learning_rate", None)
    if base_lr is None:
        logger.info("model.base_learning_rate not set; leaving the model's learning rate as it is")
        return getattr(model, "learning_rate", float("nan"))
    lr, message = scaled_learning_rate(
        base_lr=float(base_lr), batch_size=int(config.data.params.batch_size), devices=trainer.num_devices,
        accumulate_grad_batches=trainer.accumulate_grad_batches, num_nodes=trainer.num_nodes, scale=scale)
    model.learning_rate = lr
    if trainer.is_global_zero:
        logger.info(message)
    return lr


def devices_key(opt: Any, trainer_config: DictConfig) -> str:
    """The setting that chose the devices, for error messages."""
    if opt.gpus is not None:
        return "--gpus"
    return "lightning.trainer.gpus" if "gpus" in trainer_config else "lightning.trainer.devices"


def build(opt: Any, unknown: Sequence[str], now: str,
          argv: Sequence[str] = ()) -> tuple[RunPaths, DictConfig, Any, Any, pl.Trainer]:
    """Everything a run needs: its paths, the merged config, the model, the data module, the trainer.

    Every check of the config (values, strategy, devices, whether FSDP can wrap the model) runs here, in the
    process that ``main.py`` started, before Lightning starts any other process.
    """
    dotlist, trainer_overrides = split_cli_args(unknown)
    run = resolve_run(opt, now, argv)
    config = merge_configs(run.base, dotlist)
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_config = OmegaConf.merge(lightning_config.get("trainer", None) or {}, trainer_overrides)
    if opt.gpus is not None:
        trainer_config.gpus = opt.gpus
    lightning_config.trainer = trainer_config
    validate_config(config, lightning_config)
    trainer_kwargs = trainer_arguments(OmegaConf.to_container(trainer_config), gpus=opt.gpus)
    check_strategy(trainer_kwargs.get("strategy", "auto"))
    with config_source(*run.base):
        model = instantiate_from_config(config.model)
        apply_performance_options(model, config.model.get("performance", None),
                                  device_type="cpu" if trainer_kwargs.get("accelerator") == "cpu" else None)
        data = instantiate_from_config(config.data)
        trainer_kwargs = distributed_arguments(trainer_kwargs, model, lightning_config,
                                               devices_key(opt, trainer_config))
        callbacks = [SetupCallback(resume=opt.resume, now=now, logdir=str(run.logdir), ckptdir=str(run.ckptdir),
                                   cfgdir=str(run.cfgdir), config=config, lightning_config=lightning_config,
                                   job_marker=str(run.job_marker) if run.job_marker else None,
                                   print_config=getattr(opt, "print_config", False))]
        callbacks_cfg = callbacks_config(lightning_config, run, model)
        callbacks += [instantiate_from_config(c) for c in callbacks_cfg.values() if c is not None]
        callbacks += reliability_callbacks(lightning_config, run.ckptdir)
        trainer_logger = instantiate_from_config(logger_config(lightning_config, run, opt.debug))
    plugins = [*as_list(trainer_kwargs.pop("plugins", None) or []), *reliability_plugins(lightning_config)]
    trainer = pl.Trainer(**trainer_kwargs, plugins=plugins, logger=trainer_logger, callbacks=callbacks,
                         default_root_dir=str(run.logdir))
    configure_learning_rate(model, config, trainer, opt.scale_lr)
    return run, config, model, data, trainer


def run_time() -> str:
    """The run's time stamp (it names the log dir). The processes that Lightning's launcher starts for the other
    devices (``LOCAL_RANK`` > 0) take the first process's, which it leaves in the environment they inherit."""
    if os.environ.get("LOCAL_RANK", "0") != "0" and RUN_TIME_ENV in os.environ:
        return os.environ[RUN_TIME_ENV]
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_TIME_ENV] = now
    return now


def _has_split(data: Any, split: str) -> bool:
    return split in getattr(data, "dataset_configs", {split: None})


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``main.py`` with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    silence_known_warnings()
    now = run_time()
    argv = sys.argv[1:] if argv is None else argv
    opt, unknown = parse_cli(argv)
    if opt.project:
        logger.warning("-p/--project has no effect (as in the original)")
    pl.seed_everything(opt.seed)
    run, trainer = None, None
    try:
        run, config, model, data, trainer = build(opt, unknown, now, argv)
        if opt.train:
            ckpt = str(run.resume_ckpt) if run.resume_ckpt else None
            with warnings.catch_warnings():
                # a split without a config has an empty loader ("no loader" to Lightning), which Lightning warns about
                warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
                trainer.fit(model, data, ckpt_path=ckpt, weights_only=True)
        if not opt.no_test and not trainer.interrupted and not preempted(trainer):
            if _has_split(data, "test"):
                trainer.test(model, data)
            else:
                logger.info("no test split in data; skipping the test run")
    except Exception:
        if opt.debug and sys.stdin.isatty() and (trainer is None or trainer.global_rank == 0):
            import pdb

            pdb.post_mortem()
        raise
    finally:
        if opt.debug and run is not None and run.resume_ckpt is None and run.logdir.exists() and (
                trainer is None or trainer.global_rank == 0):
            dst = run.logdir.parent / "debug_runs" / run.logdir.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run.logdir), str(dst))
            logger.info("debug run moved to %s", dst)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` for the command line: a bad config, override, run folder or checkpoint (found before or while the
    run is built, or when a checkpoint is read) is one line on stderr, ``error: <what and where>``, and exit
    status 2 instead of a traceback; any other error keeps its traceback."""
    try:
        return main(argv)
    except (ConfigError, CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
