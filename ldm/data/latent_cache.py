"""Latent caches for stage two: first-stage encodings stored once, read instead of encoding images every step.

``scripts/cache_latents.py`` writes a cache directory (see :mod:`ldm.data.latent_cache_writer`)::

    cache.json                  manifest: format, first-stage fingerprint, kind, shapes, shard list with sha256
    shard-00000.safetensors     `moments` [n x 2C x h x w] (KL posterior: mean and log-variance) or `latent`
                                [n x C x h x w] (a deterministic encoding: VQ pre-quantisation, identity), plus the
                                dataset's other fields (`field.<key>` tensors; strings in the shard's metadata)

:class:`LatentCacheDataset` (a config ``target``) serves it. Its items carry the posterior parameters under
``latent_moments`` (or the latent under ``latent``) and the fingerprint of the first stage that made them;
``LatentDiffusion.get_input`` draws z from them (:func:`cached_encoding`) instead of encoding an image, so
training still samples a new z from the posterior at every step. A cache made by a different first stage is
refused, and a shard that is corrupt or belongs to another cache is reported by its file name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)

FORMAT = "ldm-latent-cache/1"
MANIFEST = "cache.json"
MOMENTS_KEY = "latent_moments"  # batch key: [N x 2C x h x w] KL posterior parameters (mean, log-variance)
LATENT_KEY = "latent"  # batch key: [N x C x h x w] deterministic first-stage encoding
FINGERPRINT_KEY = "first_stage_fingerprint"  # batch key: the fingerprint of the first stage that made the cache
FIELD_PREFIX = "field."  # shard tensors holding the dataset's other numeric fields
KINDS = {"moments": MOMENTS_KEY, "latent": LATENT_KEY}


class LatentCacheError(ValueError):
    """A latent cache that cannot be used (missing, incomplete, corrupt, or made by another first stage);
    the message names the file."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def first_stage_fingerprint(first_stage: nn.Module) -> str:
    """A sha256 over the first stage's class and its weights (names, dtypes, shapes, values; ``loss.*`` excluded),
    the same whatever the device or memory layout of the weights."""
    digest = hashlib.sha256(f"{type(first_stage).__module__}.{type(first_stage).__qualname__}".encode())
    for name, tensor in sorted(first_stage.state_dict().items()):
        if name.startswith("loss."):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def check_first_stage(first_stage: nn.Module, fingerprint: str, source: str) -> None:
    """Raises LatentCacheError unless `first_stage` has `fingerprint` (computed once per module)."""
    if first_stage not in _FINGERPRINTS:
        _FINGERPRINTS[first_stage] = first_stage_fingerprint(first_stage)
    if _FINGERPRINTS[first_stage] != fingerprint:
        raise LatentCacheError(
            f"{source} was made with a different first stage (fingerprint {fingerprint[:12]}, this model's "
            f"{_FINGERPRINTS[first_stage][:12]}): its latents do not fit this model's decoder. Cache again with "
            f"this model's first_stage_config (and ckpt_path) into a new directory")


def cached_encoding(batch: Mapping[str, Any], first_stage: nn.Module, device: torch.device,
                    n: int | None = None) -> DiagonalGaussianDistribution | torch.Tensor | None:
    """The first-stage encoding that a batch from a latent cache carries, None for a batch of images.

    :param batch: a collated batch; cached ones hold ``latent_moments`` or ``latent`` and the fingerprint.
    :param first_stage: the model's first stage, which must be the one that made the cache.
    :param n: keep the first `n` examples.
    :return: the posterior over [n x C x h x w] latents (KL caches) or the [n x C x h x w] latents.
    """
    key = MOMENTS_KEY if MOMENTS_KEY in batch else LATENT_KEY if LATENT_KEY in batch else None
    if key is None:
        return None
    fingerprints = batch.get(FINGERPRINT_KEY)
    if not fingerprints:
        raise LatentCacheError(f"a batch with '{key}' but no '{FINGERPRINT_KEY}': cached latents must come "
                               f"with the fingerprint of their first stage (use LatentCacheDataset)")
    fingerprint = fingerprints if isinstance(fingerprints, str) else fingerprints[0]
    check_first_stage(first_stage, fingerprint, "the latent cache of this batch")
    values = torch.as_tensor(batch[key])[:n].to(device=device, dtype=torch.float32)
    return DiagonalGaussianDistribution(values) if key == MOMENTS_KEY else values


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the cache at `root`; LatentCacheError naming the file when it is missing or unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LatentCacheError(f"no latent cache at {root}: {path} is missing (make one with "
                               f"scripts/cache_latents.py)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LatentCacheError(f"unreadable latent-cache manifest {path}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise LatentCacheError(f"{path} is not a latent-cache manifest of format {FORMAT} "
                               f"(format: {manifest.get('format')!r})")
    return manifest


def shard_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata, {tensor name: shape}) of a shard, without reading its tensors; LatentCacheError naming the
    file when it is missing or not a readable safetensors file (truncated, overwritten)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise LatentCacheError(f"latent-cache shard {path} is missing") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers and truncated files
        raise LatentCacheError(f"latent-cache shard {path} is corrupt or truncated ({type(e).__name__}: {e})") from e


def check_shard(path: Path, manifest: Mapping[str, Any], index: int, count: int) -> dict[str, str]:
    """Validates a shard's header against the manifest (format, fingerprint, position, count, latent shape);
    returns its metadata. LatentCacheError naming the file on any mismatch."""
    metadata, shapes = shard_header(path)
    tensor = manifest["kind"]
    expected = {"format": FORMAT, "fingerprint": manifest["fingerprint"], "shard": str(index), "count": str(count)}
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise LatentCacheError(f"latent-cache shard {path} does not belong to this cache: its {key} is "
                                   f"{metadata.get(key)!r}, the manifest {path.parent / MANIFEST} expects {value!r}")
    if shapes.get(tensor) != (count, *manifest["latent_shape"]):
        raise LatentCacheError(f"latent-cache shard {path}: '{tensor}' has shape {shapes.get(tensor)}, expected "
                               f"{(count, *manifest['latent_shape'])}")
    return metadata


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_counts(manifest: Mapping[str, Any]) -> list[int]:
    """The number of examples of each shard, in order."""
    n, size = int(manifest["num_examples"]), int(manifest["shard_size"])
    return [min(size, n - start) for start in range(0, n, size)]


class LatentCacheDataset(Dataset):
    """Stage-two training data from a latent cache written by ``scripts/cache_latents.py``.

    Items: ``latent_moments`` ([2C x h x w] float32 posterior parameters; ``latent`` [C x h x w] for deterministic
    first stages), ``first_stage_fingerprint``, and the cached dataset's other fields (class labels, captions, ...).

    :param path: the cache directory (with ``cache.json``).
    :param keys: the other fields to return (default: all that were cached).
    :param verify_checksums: also compare every shard's sha256 with the manifest (reads the whole cache once).
    :raises LatentCacheError: naming the file, for a missing manifest, a missing, corrupt or foreign shard, or
        an unfinished cache.
    """

    def __init__(self, path: str | Path, keys: Sequence[str] | None = None, verify_checksums: bool = False) -> None:
        self.root = Path(path)
        self.manifest = read_manifest(self.root)
        self.kind = self.manifest["kind"]
        self.shard_size = int(self.manifest["shard_size"])
        self.counts = shard_counts(self.manifest)
        listed = self.manifest.get("shards", {})
        missing = [shard_name(i) for i in range(len(self.counts)) if shard_name(i) not in listed]
        if missing:
            raise LatentCacheError(f"latent cache {self.root} is unfinished: {len(missing)} of {len(self.counts)} "
                                   f"shards missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                                   f"run scripts/cache_latents.py again with the same arguments to finish it")
        self.strings: list[dict[str, list[Any]]] = []
        for i, count in enumerate(self.counts):
            path_i = self.root / shard_name(i)
            metadata = check_shard(path_i, self.manifest, i, count)
            if verify_checksums and sha256_of(path_i) != listed[shard_name(i)]["sha256"]:
                raise LatentCacheError(f"latent-cache shard {path_i} is corrupt: its sha256 differs from the one "
                                       f"recorded in {self.root / MANIFEST}")
            self.strings.append(json.loads(metadata.get("strings", "{}")))
        available = list(self.manifest.get("fields", []))
        self.keys = available if keys is None else list(keys)
        unknown = [k for k in self.keys if k not in available]
        if unknown:
            raise LatentCacheError(f"latent cache {self.root} has no field(s) {unknown}; cached fields: {available}")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_examples"])

    def _shard(self, index: int) -> Any:
        if index not in self._handles:  # opened lazily, so that each DataLoader worker has its own handles
            from safetensors import safe_open

            self._handles[index] = safe_open(str(self.root / shard_name(index)), framework="pt")
        return self._handles[index]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a latent cache of {len(self)} examples")
        i %= len(self)
        shard, j = divmod(i, self.shard_size)
        f = self._shard(shard)
        try:
            item: dict[str, Any] = {KINDS[self.kind]: f.get_slice(self.kind)[j].float()}
            for key in self.keys:
                if key in self.strings[shard]:
                    item[key] = self.strings[shard][key][j]
                else:
                    item[key] = f.get_slice(FIELD_PREFIX + key)[j]
        except Exception as e:
            raise LatentCacheError(f"cannot read example {j} of latent-cache shard {self.root / shard_name(shard)} "
                                   f"({type(e).__name__}: {e})") from e
        item[FINGERPRINT_KEY] = self.manifest["fingerprint"]
        return item

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle (DataLoader workers, spawn)
        return {**self.__dict__, "_handles": {}}
