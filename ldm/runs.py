"""Run folders: find the merged config and a checkpoint of a ``main.py`` run from its log directory.

``main.py`` writes each run to ``<logdir>/<time>_<name>/``::

    checkpoints/last.ckpt           the latest state (what ``main.py -r <run>`` resumes)
    checkpoints/epoch=000012.ckpt   the top k on the model's ``monitor`` metric
    configs/<time>-project.yaml     the merged config (one per start; a resumed run adds a newer one)
    configs/<time>-lightning.yaml   the ``lightning`` section

Two readers agree on that layout here: resuming (``main.py -r``: :func:`locate_checkpoint` and
:func:`saved_configs`) and sampling from a run (:func:`resolve_run_folder`). A folder counts as a run when it
has ``checkpoints/last.ckpt``; sampling also needs ``configs/*-project.yaml``. Errors name what is missing.

Example::

    run = resolve_run_folder("logs/2024-05-01T10-00-00_ldm", checkpoint="best")
    model = load_model(run.config, run.checkpoint)
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.checkpoint import load_checkpoint
from ldm.util import ConfigError, parse_enum

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_DIR = "configs"
LAST_CHECKPOINT = "last.ckpt"
PROJECT_CONFIG_GLOB = "*-project.yaml"
TRAINSTEP_DIR = "trainstep_checkpoints"  # where the `metrics_over_trainsteps_checkpoint` callback saves


class RunFolderError(ConfigError):
    """A path is not a ``main.py`` run folder (or a checkpoint inside one); the message says what is missing."""


class CheckpointChoice(enum.Enum):
    """Which checkpoint of a run: the latest state, or the best one on the model's monitored metric."""

    LAST = "last"
    BEST = "best"


@dataclass(frozen=True)
class RunFolder:
    """A resolved run.

    :param logdir: the run folder ``<logdir>/<time>_<name>``.
    :param config: the newest ``configs/*-project.yaml`` (the merged config of the latest start): the file to
        build the model from.
    :param checkpoint: the chosen checkpoint file.
    :param configs: every saved ``configs/*.yaml`` in the order ``main.py -r`` merges them.
    """

    logdir: Path
    config: Path
    checkpoint: Path
    configs: tuple[Path, ...]


def run_folder_of_checkpoint(ckpt: str | Path) -> Path:
    """The run folder of a checkpoint file: two levels up (``<run>/checkpoints/<file>``, the original's rule),
    or three for ``<run>/checkpoints/trainstep_checkpoints/<file>``."""
    parent = Path(ckpt).parent
    if parent.name == TRAINSTEP_DIR and parent.parent.name == CHECKPOINT_DIR:
        return parent.parent.parent
    return parent.parent


def locate_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``main.py -r`` semantics: a run folder gives ``(folder, folder/checkpoints/last.ckpt)``; a checkpoint
    file gives ``(its run folder, the file)``.

    :raises RunFolderError: when the path does not exist, or the folder has no ``checkpoints/last.ckpt``.
    """
    path = Path(path)
    if path.is_file():
        return run_folder_of_checkpoint(path), path
    if not path.is_dir():
        raise RunFolderError(f"no such run folder or checkpoint: {path}")
    ckpt = path / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not ckpt.is_file():
        raise RunFolderError(f"{path} is not a main.py run folder: it has no checkpoint {ckpt}"
                             f"{_layout_hint(path)}")
    return path, ckpt


def saved_configs(logdir: str | Path) -> list[Path]:
    """Every ``configs/*.yaml`` of a run, sorted by name (time stamp): the configs ``main.py -r`` re-reads,
    before any ``--base`` files."""
    return sorted((Path(logdir) / CONFIG_DIR).glob("*.yaml"))


def project_config(logdir: str | Path) -> Path:
    """The newest ``configs/*-project.yaml`` of a run: the merged model, data and training config.

    :raises RunFolderError: naming the folder, when there is none.
    """
    logdir = Path(logdir)
    configs = sorted((logdir / CONFIG_DIR).glob(PROJECT_CONFIG_GLOB))
    if not configs:
        raise RunFolderError(f"{logdir} is not a main.py run folder: no merged config "
                             f"{logdir / CONFIG_DIR / PROJECT_CONFIG_GLOB}{_layout_hint(logdir)}")
    return configs[-1]


def best_checkpoint(logdir: str | Path) -> Path:
    """The checkpoint with the best score on the model's monitored metric, as the run's ``ModelCheckpoint``
    recorded it in ``checkpoints/last.ckpt`` (read memory-mapped: no weights are loaded).

    The file is looked up in this folder's ``checkpoints/`` by name, so a moved or copied run still works.

    :raises RunFolderError: when the run monitored no metric (its model config sets no ``monitor``, so only the
        latest state was kept), or the best file is missing.
    """
    logdir = Path(logdir)
    last = logdir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not last.is_file():
        raise RunFolderError(f"{logdir}: no {last} to read the best checkpoint's record from{_layout_hint(logdir)}")
    states = [s for s in _checkpoint_callback_states(load_checkpoint(last, mmap=True))
              if s.get("monitor") and s.get("best_model_path") and s.get("best_model_score") is not None]
    if not states:
        raise RunFolderError(f"{logdir} has no best checkpoint: its ModelCheckpoint monitored no metric (the model "
                             f"config sets no `monitor`, or no validation ran before {last} was written); use "
                             f"the last checkpoint")
    # the default callback saves into checkpoints/ itself; others (e.g. trainstep checkpoints) into sub-folders
    state = next((s for s in states if Path(str(s.get("dirpath", ""))).name == CHECKPOINT_DIR), states[0])
    recorded = Path(str(state["best_model_path"]))
    path = logdir / CHECKPOINT_DIR / recorded.name
    if not path.is_file():
        raise RunFolderError(f"{logdir}: the best checkpoint on {state['monitor']} ({recorded.name}, score "
                             f"{float(state['best_model_score']):.6g}) is missing from {path.parent}")
    logger.info("best checkpoint of %s: %s (%s = %.6g)", logdir, path.name, state["monitor"],
                float(state["best_model_score"]))
    return path


def resolve_run_folder(path: str | Path, checkpoint: CheckpointChoice | str | None = None) -> RunFolder:
    """The merged config and a checkpoint of a ``main.py`` run.

    :param path: the run folder ``<logdir>/<time>_<name>``, or a checkpoint file inside one.
    :param checkpoint: for a folder, ``"last"`` (default: ``checkpoints/last.ckpt``) or ``"best"`` (the best on
        the monitored metric, see :func:`best_checkpoint`). Must be None when `path` is a checkpoint file.
    :raises RunFolderError: naming the path and what is missing (no such path, no ``configs/*-project.yaml``,
        no ``checkpoints/last.ckpt``, no monitored metric for ``"best"``).
    """
    path = Path(path)
    if path.is_file():
        if checkpoint is not None:
            raise RunFolderError(f"{path} is a checkpoint file; choose a checkpoint ({checkpoint!r}) only together "
                                 f"with a run folder")
        logdir, ckpt = run_folder_of_checkpoint(path), path
    elif not path.is_dir():
        raise RunFolderError(f"no such run folder or checkpoint: {path}")
    else:
        logdir = path
        choice = parse_enum(CheckpointChoice, checkpoint or CheckpointChoice.LAST, "checkpoint")
        _require_run_layout(logdir)
        last = logdir / CHECKPOINT_DIR / LAST_CHECKPOINT
        ckpt = best_checkpoint(logdir) if choice is CheckpointChoice.BEST else last
    run = RunFolder(logdir=logdir, config=project_config(logdir), checkpoint=ckpt,
                    configs=tuple(saved_configs(logdir)))
    logger.info("run %s: config %s, checkpoint %s", run.logdir, run.config.name, run.checkpoint.name)
    return run


def _checkpoint_callback_states(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved states of ``ModelCheckpoint`` callbacks (keys are strings in Lightning 2, classes in 1.x)."""
    callbacks = ckpt.get("callbacks") or {}
    return [state for state in callbacks.values() if isinstance(state, dict) and "best_model_path" in state]


def _require_run_layout(logdir: Path) -> None:
    """Raises a :class:`RunFolderError` listing every part of the run layout that `logdir` lacks."""
    missing = [str(p.relative_to(logdir)) for p in (logdir / CONFIG_DIR / PROJECT_CONFIG_GLOB,
                                                    logdir / CHECKPOINT_DIR / LAST_CHECKPOINT)
               if not any(p.parent.glob(p.name))]
    if missing:
        raise RunFolderError(f"{logdir} is not a main.py run folder: it has no {' and no '.join(missing)}"
                             f"{_layout_hint(logdir)}")


def _is_run(path: Path) -> bool:
    return (path / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file()


def _layout_hint(path: Path) -> str:
    """A hint for a near miss: a folder of runs, or a folder inside a run."""
    if path.name in (CHECKPOINT_DIR, CONFIG_DIR) and _is_run(path.parent):
        return f" (it is inside the run folder {path.parent}; pass that)"
    if path.is_dir():
        runs = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
        if runs:
            return f" (it holds {len(runs)} run folder(s); the newest is {runs[-1]})"
    return " (a run folder is <logdir>/<time>_<name>/ as main.py writes it)"
