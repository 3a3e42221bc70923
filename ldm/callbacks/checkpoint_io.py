"""`AtomicCheckpointIO`: the checkpoint writer of ``main.py`` (crash-safe writes, safe loading)."""
from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ldm.checkpoint import atomic_write, load_checkpoint, save_safetensors

logger = logging.getLogger(__name__)


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
