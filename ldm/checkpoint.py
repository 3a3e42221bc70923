"""Safe checkpoint reading and crash-safe writing: weights-only unpickling for .ckpt/.pt/.pth, and safetensors.

A Lightning ``.ckpt`` is a pickle, and a pickle can run code when loaded. Everything in this project loads
checkpoints through :func:`load_checkpoint`, which never executes code from the file:

- plain tensors and containers load as they are (``torch.load(weights_only=True)``);
- the harmless objects that checkpoints of the original code (Lightning 1.x) carry -- callback classes used as
  keys of ``callbacks``, ``omegaconf`` containers and Lightning's ``AttributeDict`` in ``hyper_parameters``,
  numpy scalars -- are rebuilt as inert stand-ins (:class:`InertObject`) or plain values, so such files load
  without importing or calling anything they name;
- anything else (``builtins.exec``, ``subprocess.call``, ...) is refused with an :class:`UnsafeCheckpointError`
  that names the file and the offending globals.

Writing goes to a temporary file in the same directory that is fsynced and then renamed over the target, so
a process killed in the middle of a save leaves the previous file intact (:func:`save_checkpoint`,
:func:`save_safetensors`). :func:`load_weights` loads a state dict into a module and reports missing and
unexpected keys and shape mismatches by name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
MAX_LISTED_KEYS = 12  # how many offending keys an error message names before summarising with a count

# Classes that checkpoints of the original code name, rebuilt as inert stand-ins: exact names and prefixes.
HARMLESS_STANDIN_NAMES = (
    "typing.Any",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "argparse.Namespace",
)
HARMLESS_STANDIN_PREFIXES = (
    "omegaconf.",
    "pytorch_lightning.callbacks.",
    "lightning.pytorch.callbacks.",
)
# Plain types that configs record as type references (e.g. omegaconf's ``object_type``); calling them on plain
# data is harmless.
PLAIN_TYPES = {f"builtins.{t.__name__}": t for t in (dict, list, tuple, set, int, float, str, bool, bytes)}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated or of the wrong architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references code that loading it would run; it was refused."""


class InertObject:
    """A stand-in for an object of a class a checkpoint names but that is never imported or run.

    ``args`` holds the constructor arguments the pickle passed and ``state`` what it set as the object's state
    (plain data); the stand-in class's ``__qualname__`` is the dotted name the pickle referred to.
    """

    legacy_name = ""

    def __init__(self, *args: Any) -> None:
        """The arguments were recorded by ``__new__``."""

    def __new__(cls, *args: Any) -> "InertObject":
        obj = super().__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.legacy_name}>"


def _standin_class(name: str) -> type:
    """A new subclass of :class:`InertObject` standing for the global `name` (``module.Qualname``)."""
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"legacy_name": name, "__module__": __name__})


class _PlainMapping:
    """Rebuilds a dict subclass (``AttributeDict``, ``defaultdict``) as a plain dict; the pickle adds its items."""

    def __new__(cls, *args: Any) -> dict:  # type: ignore[misc]
        return {}


def _numpy_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype`` restricted to numeric and string types (never ``object``)."""
    dtype = np.dtype(spec, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy object dtype in checkpoint")
    return dtype


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """``numpy.core.multiarray.scalar`` for numeric dtypes: decodes the raw bytes of one value."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of an object dtype in checkpoint")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_SAFE_FUNCTIONS: dict[str, Callable] = {
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "collections.defaultdict": _PlainMapping,
    "pytorch_lightning.utilities.parsing.AttributeDict": _PlainMapping,
    "lightning.pytorch.utilities.parsing.AttributeDict": _PlainMapping,
    **PLAIN_TYPES,
}


def is_harmless_global(name: str) -> bool:
    """Whether loading may rebuild the global `name` (``module.Name``) without running code from it."""
    return (name in _SAFE_FUNCTIONS or name in HARMLESS_STANDIN_NAMES
            or any(name.startswith(p) for p in HARMLESS_STANDIN_PREFIXES))


def _numpy_dtype_classes() -> list[type]:
    """The classes of numpy's plain dtypes: the unpickler sets their state (byte order) after building them."""
    return list({type(np.dtype(code)) for code in np.typecodes["All"] if code != "O"})


def _allowlist_for(names: Iterable[str]) -> list[Any]:
    entries: list[Any] = _numpy_dtype_classes()
    for name in names:
        if name in _SAFE_FUNCTIONS:
            entries.append((_SAFE_FUNCTIONS[name], name))
        else:
            entries.append((_standin_class(name), name))
    return entries


def _unsafe_message(path: Path, offending: Sequence[str]) -> str:
    return (f"refused to load {path}: its pickle references {', '.join(offending)}, which loading would "
            f"import or call (it could run code). Only tensors, containers and known-harmless objects are "
            f"loaded. If you trust this file, convert it to safetensors in an isolated environment.")


def _scan_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {e}") from e


def _load_pickle(path: Path, map_location: Any, mmap: bool = False) -> Any:
    # the zip format (torch >= 1.6) can be scanned for the globals it names before anything is unpickled
    is_zip = zipfile.is_zipfile(path)
    names = _scan_globals(path) if is_zip else []
    offending = [n for n in names if not is_harmless_global(n)]
    if offending:
        raise UnsafeCheckpointError(_unsafe_message(path, offending))
    try:
        with torch.serialization.safe_globals(_allowlist_for(names)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle holds data that is not plain tensors and containers "
            f"({str(e).splitlines()[0]}). If you trust this file, convert it to safetensors in an isolated "
            f"environment.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a checkpoint): {e}") from e


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Reads a checkpoint without executing code from it.

    :param path: a Lightning ``.ckpt``, a torch ``.pt``/``.pth`` or a ``.safetensors`` file.
    :param map_location: as for ``torch.load`` (a device, a string or a callable).
    :param mmap: map the tensors of a zip-format pickle from the file instead of reading them (cheap when only
        the metadata of a large checkpoint is needed).
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

        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        try:
            return {"state_dict": load_file(str(path), device=str(device))}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {e}") from e
    ckpt = _load_pickle(path, map_location, mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    if "state_dict" not in ckpt:
        ckpt = {"state_dict": ckpt}
    return ckpt


def read_safetensors(path: str | Path, tensors: bool = True,
                     description: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU; none unless `tensors`) and the metadata of a ``.safetensors`` file.

    :param description: what the file is, for messages (e.g. "LoRA file").
    :raises FileNotFoundError, CheckpointError: naming the file when it is missing or unreadable.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{description} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {description} {path}: {e}") from e


def load_state_dict(path: str | Path, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint file (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, map_location)["state_dict"]


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    If the body raises (a disk-full or permission error, an interrupt) the temporary file is removed and the
    previous file at `path`, if any, is left as it was. A process killed in the body leaves only a stray
    ``<path>.tmp-<pid>`` file beside an intact `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # persist the rename itself; not possible on every filesystem
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Writes a checkpoint atomically: ``torch.save`` for ``.ckpt``/``.pt``, safetensors for ``.safetensors``.

    :param checkpoint: a dict; for ``.safetensors`` its ``state_dict`` (or the dict itself) of tensors.
    :raises OSError: when the file cannot be written; the previous file at `path` is kept.
    """
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        save_safetensors(checkpoint.get("state_dict", checkpoint), path)
        return
    with atomic_write(path) as tmp:
        torch.save(dict(checkpoint), tmp)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes a state dict as a ``.safetensors`` file, atomically.

    Tensors that share memory (tied weights) are stored as separate copies; non-tensor entries are skipped
    with a warning, since safetensors holds tensors only.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    skipped = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            skipped.append(key)
            continue
        value = value.detach()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if ident is not None and ident in seen or not value.is_contiguous():
            value = value.clone()
        elif ident is not None:
            seen.add(ident)
        tensors[key] = value.contiguous().cpu()
    if skipped:
        logger.warning("save_safetensors(%s): skipped %d non-tensor entries: %s", path, len(skipped),
                       ", ".join(skipped[:MAX_LISTED_KEYS]))
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)


def key_listing(title: str, items: Sequence[str]) -> str:
    """``"<count> <title>: a, b, c ... and N more"``, naming at most MAX_LISTED_KEYS items, for error messages."""
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    more = f" ... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else ""
    return f"{len(items)} {title}: {shown}{more}"


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 ignore_prefixes: Sequence[str] = (), source: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Loads `state_dict` into `module`, naming every key that does not fit.

    :param ignore_prefixes: keys starting with any of these are dropped from the state dict and not reported
        as missing (the original ``ignore_keys``).
    :param source: the file the state dict came from, for messages.
    :return: (missing keys, unexpected keys); both empty when `strict`.
    :raises CheckpointError: on any shape mismatch (name and both shapes), and when `strict`, on any missing or
        unexpected key; the message gives counts and the first keys of each kind.
    """
    ignored = tuple(ignore_prefixes)
    sd = {k: v for k, v in state_dict.items() if not (ignored and k.startswith(ignored))}
    own = {k: v for k, v in module.state_dict().items() if not (ignored and k.startswith(ignored))}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
                  for k in own if k in sd and isinstance(sd[k], torch.Tensor) and sd[k].shape != own[k].shape]
    problems = []
    if mismatched:
        problems.append(key_listing("shape mismatches", mismatched))
    if strict and missing:
        problems.append(key_listing("missing keys", missing))
    if strict and unexpected:
        problems.append(key_listing("unexpected keys", unexpected))
    if problems:
        where = f" from {source}" if source else ""
        raise CheckpointError(f"cannot load weights{where} into {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        logger.info("loaded weights%s with %s; %s", f" from {source}" if source else "",
                    key_listing("missing keys", missing), key_listing("unexpected keys", unexpected))
    return missing, unexpected
