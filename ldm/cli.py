"""The pieces of the `main.py` command line: flags, config merging, run directories, trainer arguments, lr rule.

Everything here is a pure function of its arguments (no training, no files written), so it can be tested alone;
:mod:`ldm.train` puts them together.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.runs import RunFolderError, locate_checkpoint, saved_configs
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

# Trainer arguments of Lightning 1.x that the original configs may carry.
RENAMED_TRAINER_ARGS = {"replace_sampler_ddp": "use_distributed_sampler", "distributed_backend": "strategy"}
REMOVED_TRAINER_ARGS = ("weights_summary", "progress_bar_refresh_rate", "flush_logs_every_n_steps",
                        "terminate_on_nan", "auto_select_gpus", "track_grad_norm", "move_metrics_to_cpu",
                        "resume_from_checkpoint", "checkpoint_callback", "prepare_data_per_node")
# Lightning 1.x `accelerator` values that named a distributed strategy (Lightning 2 has only ddp and ddp_spawn).
LEGACY_ACCELERATORS = {"ddp": "ddp", "ddp_spawn": "ddp_spawn", "ddp2": "ddp", "dp": "ddp", "ddp_cpu": "ddp"}


def str2bool(v: str | bool) -> bool:
    """Parses yes/no, true/false, t/f, y/n, 1/0 (any case) as the original CLI did."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{v}'")


def get_parser() -> argparse.ArgumentParser:
    """The flags of the original ``main.py`` (plus ``--gpus``, which Lightning 1.x added there)."""
    parser = argparse.ArgumentParser(
        prog="main.py", description="Train or test a model built from YAML configs. Trailing key=value "
        "arguments override config entries (e.g. model.params.x=1 lightning.trainer.max_steps=10); "
        "--<trainer argument> <value> sets a Lightning Trainer argument.")
    bool_flag = dict(type=str2bool, nargs="?", const=True)
    parser.add_argument("-n", "--name", type=str, default="", help="name of the run (log dir <now>_<name>)")
    parser.add_argument("-r", "--resume", type=str, default="",
                        help="resume from a log dir (uses checkpoints/last.ckpt) or a checkpoint inside one")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="config files, merged left to right, then the key=value overrides")
    parser.add_argument("-t", "--train", default=False, help="train", **bool_flag)
    parser.add_argument("--no-test", default=False, help="do not test after training", **bool_flag)
    parser.add_argument("-p", "--project", help="accepted for compatibility with the original; has no effect")
    parser.add_argument("-d", "--debug", default=False, help="post-mortem debugging; run goes to debug_runs/",
                        **bool_flag)
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="appended to the default run name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory that holds the runs")
    parser.add_argument("--scale_lr", default=True, help="lr = accumulate_grad_batches * devices * batch_size * "
                        "base_learning_rate (True, as in the original) or base_learning_rate (False)", **bool_flag)
    parser.add_argument("--gpus", type=str, default=None,
                        help="GPUs as in Lightning 1.x: '0,1' (indices), '0,' (GPU 0), '2' (two GPUs), '-1' "
                             "(all); CPU when absent")
    parser.add_argument("--print_config", default=False, help="also print the merged config (it is always saved "
                        "to <run>/configs/)", **bool_flag)
    return parser


BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr", "--print_config")
BOOL_WORDS = ("yes", "true", "t", "y", "1", "no", "false", "f", "n", "0")


def explicit_bool_flags(argv: Sequence[str]) -> list[str]:
    """Writes out ``True`` after a boolean flag that is followed by something other than a boolean word, so that
    ``-t model.params.x=1`` means "train, with this override" rather than a failed attempt to read ``-t``'s value.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in BOOL_FLAGS and nxt is not None and nxt.lower() not in BOOL_WORDS and not nxt.startswith("-"):
            out.append("True")
    return out


def parse_cli(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The known flags, and the rest (overrides and Trainer arguments, see :func:`split_cli_args`)."""
    return get_parser().parse_known_args(explicit_bool_flags(argv))


def parse_gpus(spec: Any) -> list[int] | int | None:
    """Reads a ``--gpus`` value the way Lightning 1.x did.

    :return: a list of device indices ("0,1" -> [0, 1], "0," -> [0]), a count ("2" -> 2, "-1" -> -1 = all),
        or None for CPU (absent, empty, or "0").
    :raises ValueError: naming the value, when it is none of those.
    """
    if spec is None or spec == "" or spec == []:
        return None
    if isinstance(spec, bool):
        raise ValueError(f"--gpus: expected indices like '0,1' or a count, got {spec!r}")
    if isinstance(spec, int):
        count = spec
    elif isinstance(spec, (list, tuple)) or hasattr(spec, "__iter__") and not isinstance(spec, str):
        return [int(i) for i in spec]
    else:
        text = str(spec).strip()
        try:
            if "," in text:
                return [int(i) for i in text.split(",") if i.strip()]
            count = int(text)
        except ValueError:
            raise ValueError(f"--gpus: expected indices like '0,1' or a count, got {spec!r}") from None
    if count < -1:
        raise ValueError(f"--gpus: a count must be >= -1, got {spec!r}")
    return None if count == 0 else count


def device_count(devices: list[int] | int | str | None, available: int = 1) -> int:
    """How many devices a Lightning ``devices`` value asks for (`available` stands for -1 / "auto")."""
    if devices is None:
        return 1
    if isinstance(devices, str):
        devices = available if devices in ("auto", "-1") else parse_gpus(devices)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return available if devices == -1 else int(devices or 1)


def split_cli_args(unknown: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Splits the arguments argparse did not know into config overrides and Trainer arguments.

    ``a.b=1`` is an OmegaConf dot-list override; ``--max_steps 10`` or ``--max_steps=10`` a Trainer argument
    (value parsed as YAML).

    :raises ConfigError: naming an argument that is neither, with the closest Trainer argument names.
    """
    from pytorch_lightning import Trainer

    trainer_args = [n for n in inspect.signature(Trainer.__init__).parameters if n != "self"]
    dotlist: list[str] = []
    trainer: dict[str, Any] = {}
    i = 0
    while i < len(unknown):
        arg = unknown[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(unknown) or unknown[i + 1].startswith("--"):
                    raise ConfigError(f"argument '{arg}' needs a value")
                value = unknown[i + 1]
                i += 1
            if key not in trainer_args:
                close = difflib.get_close_matches(key, trainer_args, n=3)
                hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
                raise ConfigError(f"unknown argument '--{key}'{hint}; config overrides are written key.sub=value")
            trainer[key] = yaml.safe_load(value)
        elif "=" in arg:
            dotlist.append(arg)
        else:
            raise ConfigError(f"cannot read argument '{arg}': expected key=value or --trainer_arg value")
        i += 1
    return dotlist, trainer


def load_config(path: str | Path) -> DictConfig:
    """Reads one YAML config; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(config).__name__}, not a mapping")
    return config


def merge_configs(paths: Sequence[str | Path], dotlist: Sequence[str] = ()) -> DictConfig:
    """Merges config files left to right (later files win, lists are replaced), then `dotlist` overrides."""
    configs = [load_config(p) for p in paths]
    try:
        overrides = OmegaConf.from_dotlist(list(dotlist))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read override(s) {' '.join(dotlist)}: {e}") from None
    return OmegaConf.merge(*configs, overrides)


@dataclass
class RunPaths:
    """Where a run logs. `resume_ckpt` is the checkpoint to resume from (None for a new run); `job_marker` is the
    file where a run inside a SLURM job records its log dir, so that the job, re-queued, resumes it."""

    logdir: Path
    nowname: str
    base: list[str]
    resume_ckpt: Path | None = None
    job_marker: Path | None = None
    ckptdir: Path = field(init=False)
    cfgdir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ckptdir = self.logdir / "checkpoints"
        self.cfgdir = self.logdir / "configs"


def slurm_job_marker(opt: argparse.Namespace, argv: Sequence[str],
                     environ: Mapping[str, str] | None = None) -> tuple[Path, bool] | None:
    """(marker file, whether the job was re-queued) for a ``main.py`` command inside a SLURM job, else None.

    The marker is ``<logdir>/.slurm_runs/<job id>-<digest of the command line>``: a re-queued job runs its script
    again with the same job id and the same commands, and each command finds its own run (a script that trains
    stage one and then stage two has two markers).
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    digest = hashlib.sha1("\0".join(argv).encode()).hexdigest()[:12]
    return Path(opt.logdir) / ".slurm_runs" / f"{job}-{digest}", int(env.get("SLURM_RESTART_COUNT", 0) or 0) > 0


def resolve_run(opt: argparse.Namespace, now: str, argv: Sequence[str] = (),
                environ: Mapping[str, str] | None = None) -> RunPaths:
    """The run directory, name, configs and checkpoint for the parsed flags, as the original decided them.

    ``-r <logdir>`` resumes ``<logdir>/checkpoints/last.ckpt``; ``-r <ckpt>`` resumes that file, whose log dir is
    two levels up. A resumed run re-reads ``<logdir>/configs/*.yaml`` before the ``-b`` configs. A new run is
    ``<logdir>/<now>_<name>`` with `name` from ``-n``, else the first config's file name plus ``-f``. Inside a SLURM
    job that was re-queued (``SLURM_RESTART_COUNT`` > 0), the same command line resumes the run it started before
    the job was re-queued, if that run has a ``last.ckpt`` (see :func:`slurm_job_marker`).

    :param argv: the command line (identifies the command within a SLURM job).
    """
    if opt.name and opt.resume:
        raise ConfigError("-n/--name and -r/--resume cannot be given together: a resumed run keeps its log dir")
    found = slurm_job_marker(opt, argv, environ)
    marker = found[0] if found else None
    if opt.resume:
        return _resumed_run(Path(opt.resume), opt.base, marker)
    if found and found[1] and marker.is_file():
        logdir = Path(marker.read_text().strip())
        if (logdir / "checkpoints" / "last.ckpt").is_file():
            logger.warning("this SLURM job was re-queued: resuming %s", logdir)
            return _resumed_run(logdir, opt.base, marker)
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    nowname = now + name + opt.postfix
    return RunPaths(logdir=Path(opt.logdir) / nowname, nowname=nowname, base=list(opt.base), job_marker=marker)


def _resumed_run(resume: Path, base: Sequence[str], marker: Path | None) -> RunPaths:
    try:
        logdir, ckpt = locate_checkpoint(resume)
    except RunFolderError as e:
        raise ConfigError(f"-r/--resume: {e}") from None
    saved = [str(p) for p in saved_configs(logdir)]
    return RunPaths(logdir=logdir, nowname=logdir.name, base=saved + list(base), resume_ckpt=ckpt, job_marker=marker)


def trainer_arguments(trainer_config: dict[str, Any], gpus: Any = None) -> dict[str, Any]:
    """Translates a ``lightning.trainer`` section (Lightning 1.x spellings included) into Trainer arguments.

    `gpus` (``--gpus``, else the section's ``gpus``) becomes ``accelerator="gpu", devices=...`` with
    ``strategy="ddp"`` for several devices; without GPUs (and no explicit ``accelerator``) it is the CPU.

    :raises ConfigError: naming an unknown trainer key and the closest valid ones.
    """
    from pytorch_lightning import Trainer

    valid = [n for n in inspect.signature(Trainer.__init__).parameters if n != "self"]
    kwargs = dict(trainer_config)
    spec = gpus if gpus is not None else kwargs.get("gpus", None)
    gpus = parse_gpus(spec)
    if gpus is None and spec is not None and str(spec).strip() == "0":
        logger.warning("--gpus 0 asks for zero GPUs (as in Lightning 1.x): training on the CPU; "
                       "write --gpus 0, for GPU 0")
    kwargs.pop("gpus", None)
    for old, new in RENAMED_TRAINER_ARGS.items():
        if old in kwargs:
            kwargs.setdefault(new, kwargs.pop(old))
    for old in REMOVED_TRAINER_ARGS:
        if old in kwargs:
            logger.warning("ignoring lightning.trainer.%s: Lightning 2 has no such argument", old)
            kwargs.pop(old)
    multi_device_strategy = LEGACY_ACCELERATORS.get(kwargs.get("accelerator"), "ddp")
    if kwargs.get("accelerator") in LEGACY_ACCELERATORS:
        kwargs.pop("accelerator")  # as in the original: the strategy applies only when there are GPUs
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=3)
            hints.append(f"'lightning.trainer.{k}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"unknown trainer argument(s): {', '.join(hints)}")
    if gpus is not None:
        kwargs["accelerator"] = "gpu"
        kwargs["devices"] = gpus
        if kwargs.get("strategy", "auto") == "auto" and device_count(gpus, available=2) > 1:
            kwargs["strategy"] = multi_device_strategy
    elif "accelerator" not in kwargs and "devices" not in kwargs:
        kwargs["accelerator"] = "cpu"
        kwargs["devices"] = 1
    return kwargs


def scaled_learning_rate(base_lr: float, batch_size: int, devices: int, accumulate_grad_batches: int = 1,
                         num_nodes: int = 1, scale: bool = True) -> tuple[float, str]:
    """The original's learning-rate rule, and a sentence that reports it (with the world size and global batch).

    :return: ``accumulate_grad_batches * devices * num_nodes * batch_size * base_lr`` if `scale`, else `base_lr`.
    """
    if not scale:
        return base_lr, f"learning rate {base_lr:.2e} (base_learning_rate; --scale_lr False)"
    lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_lr
    nodes = f" * {num_nodes} (nodes)" if num_nodes != 1 else ""
    return lr, (f"learning rate {lr:.2e} = {accumulate_grad_batches} (accumulate_grad_batches) * {devices} "
                f"(devices){nodes} * {batch_size} (batch size) * {base_lr:.2e} (base_learning_rate), for a world "
                f"size of {devices * num_nodes} process(es) and a global batch of "
                f"{accumulate_grad_batches * devices * num_nodes * batch_size}; --scale_lr False to use "
                f"base_learning_rate as it is")
