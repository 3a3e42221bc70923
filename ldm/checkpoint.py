"""Safe checkpoint reading: weights-only unpickling for .ckpt/.pt/.pth, and safetensors.

A Lightning ``.ckpt`` is a pickle, and a pickle can run code when loaded. Everything in this project loads
checkpoints through :func:`load_checkpoint`, which never executes code from the file.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated or of the wrong architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references code that loading it would run; it was refused."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint without executing code from it.

    :param path: a Lightning ``.ckpt``, a torch ``.pt``/``.pth`` or a ``.safetensors`` file.
    :return: the checkpoint dict; a safetensors file or a bare state dict is returned as ``{"state_dict": ...}``.
    :raises FileNotFoundError: naming the path, when it does not exist.
    :raises UnsafeCheckpointError: when the pickle would import or call something that is not plain data.
    :raises CheckpointError: when the file is truncated or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return {"state_dict": load_file(str(path), device=str(map_location))}
        except SafetensorError as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from e
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle references objects that are not plain tensors and "
            f"containers, so loading it could run code ({str(e).splitlines()[0]}). If you trust this "
            f"file, convert it to safetensors in an isolated environment.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    return ckpt


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint file (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, map_location)["state_dict"]
