"""Writing a latent cache (the format is described in :mod:`ldm.data.latent_cache`): encode a dataset once with a
frozen first stage, shard by shard, resumably.

Each shard is written atomically and recorded in the manifest with its sha256, so an interrupted run leaves only
whole shards; running again with the same arguments skips them and goes on with the next. A directory holding a
cache of another first stage, dataset or layout is refused instead of being mixed into.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ldm.checkpoint import atomic_write
from ldm.data.latent_cache import (FIELD_PREFIX, FORMAT, MANIFEST, LatentCacheError, check_shard, read_manifest,
                                   sha256_of, shard_counts, shard_name)

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# manifest entries that must agree for a run to resume an existing cache
PLAN_KEYS = ("fingerprint", "num_examples", "shard_size", "dtype", "image_key", "source")


@dataclasses.dataclass
class CachePlan:
    """What a cache holds: which first stage, which examples, how they are laid out."""

    fingerprint: str
    num_examples: int
    shard_size: int
    dtype: str
    image_key: str
    source: Mapping[str, Any]  # where the examples come from (config, split, dataset config, passes), for humans

    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self), "shards": {}}


def split_encoding(encoding: Any) -> tuple[str, torch.Tensor]:
    """("moments", [N x 2C x h x w]) for a KL posterior, ("latent", [N x C x h x w]) for a tensor encoding."""
    if isinstance(encoding, torch.Tensor):
        return "latent", encoding
    parameters = getattr(encoding, "parameters", None)
    if isinstance(parameters, torch.Tensor) and callable(getattr(encoding, "sample", None)):
        return "moments", parameters
    raise LatentCacheError(f"first-stage encode() returned a {type(encoding).__name__}, neither a tensor nor a "
                           f"Gaussian posterior; for VQ first stages use ldm.models.autoencoder.VQModelInterface")


def batch_fields(batch: Mapping[str, Any], image_key: str, n: int) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """The fields of a collated batch other than the image: ({key: [n x ...] tensor}, {key: list of n values}).
    Fields that are neither tensors nor JSON values are left out (logged once per key)."""
    tensors, strings = {}, {}
    for key, value in batch.items():
        if key == image_key:
            continue
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and len(value) == n:
            tensors[key] = value.detach().cpu().contiguous()
            continue
        try:
            values = list(value)
            json.dumps(values)
        except (TypeError, ValueError):
            if key not in _SKIPPED:
                _SKIPPED.add(key)
                logger.warning("latent cache: field '%s' (%s) is neither a tensor nor JSON; not cached", key,
                               type(value).__name__)
            continue
        strings[key] = values
    return tensors, strings


_SKIPPED: set[str] = set()


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


class CacheWriter:
    """Encodes `dataset` (repeated `passes` times, for augmentations) into the cache at `root`.

    :param first_stage: the frozen first stage (its ``encode`` gives a posterior or a tensor).
    :param image_key: the dataset's image field ([H x W x C] in [-1, 1], as the original datasets).
    :param plan: the cache's identity; an existing cache at `root` must have the same plan.
    :param seed: shard `i` is made with seed ``seed + i``, so a resumed cache has the shards a single run makes.
    """

    def __init__(self, root: str | Path, first_stage: nn.Module, dataset: Dataset, plan: CachePlan,
                 batch_size: int = 16, num_workers: int = 0, device: torch.device | str = "cpu", seed: int = 0):
        self.root = Path(root)
        self.first_stage = first_stage
        self.dataset = dataset
        self.plan = plan
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.seed = seed
        self.manifest = self._open()

    def _open(self) -> dict[str, Any]:
        """The manifest to continue: the existing one if its plan agrees, else a new one (the directory must then
        hold no cache)."""
        if not (self.root / MANIFEST).exists():
            self.root.mkdir(parents=True, exist_ok=True)
            if any(self.root.glob("shard-*.safetensors")):
                raise LatentCacheError(f"{self.root} holds shards but no {MANIFEST}; choose an empty directory")
            return self.plan.manifest()
        manifest = read_manifest(self.root)
        new = self.plan.manifest()
        if manifest["fingerprint"] != new["fingerprint"]:
            raise LatentCacheError(f"the latent cache at {self.root} was made with a different first stage "
                                   f"(fingerprint {manifest['fingerprint'][:12]}, this one {new['fingerprint'][:12]}); "
                                   f"cache into a new directory")
        for key in PLAN_KEYS:
            if json.dumps(manifest.get(key), sort_keys=True) != json.dumps(new[key], sort_keys=True):
                raise LatentCacheError(f"the latent cache at {self.root} was made with another {key} "
                                       f"({manifest.get(key)!r}, now {new[key]!r}); resume with the same arguments "
                                       f"or cache into a new directory")
        return manifest

    def done(self) -> set[int]:
        """The shards already complete: listed in the manifest, or written but not yet listed (a run killed
        between the two); a listed shard whose file is gone or broken is made again."""
        counts = shard_counts(self.manifest)
        complete = set()
        for i, count in enumerate(counts):
            path = self.root / shard_name(i)
            if not path.exists():
                self.manifest["shards"].pop(shard_name(i), None)
                continue
            try:
                check_shard(path, self.manifest, i, count)
            except LatentCacheError as e:
                logger.warning("%s; encoding it again", e)
                self.manifest["shards"].pop(shard_name(i), None)
                continue
            if shard_name(i) not in self.manifest["shards"]:
                self._record(i, count, path)
            complete.add(i)
        return complete

    def _record(self, index: int, count: int, path: Path) -> None:
        self.manifest["shards"][shard_name(index)] = {"count": count, "sha256": sha256_of(path)}
        with atomic_write(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True))

    def _batches(self, index: int, count: int) -> Iterator[Mapping[str, Any]]:
        start = index * self.plan.shard_size
        n = len(self.dataset)
        indices = [(start + k) % n for k in range(count)]  # pass p of the dataset is examples [p n, (p + 1) n)
        seed = self.seed + index
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        loader = DataLoader(Subset(self.dataset, indices), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, worker_init_fn=_seed_worker,
                            generator=torch.Generator().manual_seed(seed))
        yield from loader

    @torch.inference_mode()
    def _encode_shard(self, index: int, count: int, progress: tqdm) -> None:
        dtype = STORAGE_DTYPES[self.plan.dtype]
        parts: dict[str, list[torch.Tensor]] = {}
        strings: dict[str, list[Any]] = {}
        kind = None
        for batch in self._batches(index, count):
            if self.plan.image_key not in batch:
                raise LatentCacheError(f"dataset items have no '{self.plan.image_key}' "
                                       f"(keys: {', '.join(map(str, batch))}); set --image-key")
            x = torch.as_tensor(batch[self.plan.image_key])
            x = x.permute(0, 3, 1, 2).float().contiguous().to(self.device)  # [N x H x W x C] -> [N x C x H x W]
            kind, values = split_encoding(self.first_stage.encode(x))
            parts.setdefault(kind, []).append(values.to(dtype).cpu())
            tensors, texts = batch_fields(batch, self.plan.image_key, len(x))
            for key, value in tensors.items():
                parts.setdefault(FIELD_PREFIX + key, []).append(value)
            for key, value in texts.items():
                strings.setdefault(key, []).extend(value)
            progress.update(len(x))
        data = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        fields = sorted([k[len(FIELD_PREFIX):] for k in data if k.startswith(FIELD_PREFIX)] + list(strings))
        self._describe(kind, tuple(data[kind].shape[1:]), fields)
        metadata = {"format": FORMAT, "fingerprint": self.plan.fingerprint, "shard": str(index), "count": str(count),
                    "strings": json.dumps(strings)}
        from safetensors.torch import save_file

        path = self.root / shard_name(index)
        with atomic_write(path) as tmp:
            save_file(data, str(tmp), metadata=metadata)
        self._record(index, count, path)

    def _describe(self, kind: str, shape: tuple[int, ...], fields: list[str]) -> None:
        """Records the kind, latent shape and fields in the manifest (they must agree from shard to shard)."""
        described = {"kind": kind, "latent_shape": list(shape), "fields": fields}
        for key, value in described.items():
            if self.manifest.setdefault(key, value) != value:
                raise LatentCacheError(f"examples of the dataset differ in {key} ({self.manifest[key]} before, "
                                       f"{value} now): a cache needs fixed-size images and the same fields")

    def write(self) -> Path:
        """Encodes every missing shard (with a progress bar over examples); returns the cache directory."""
        counts = shard_counts(self.manifest)
        if not counts:
            raise LatentCacheError("the dataset is empty: nothing to cache")
        complete = self.done()
        todo = [i for i in range(len(counts)) if i not in complete]
        if complete:
            logger.info("latent cache %s: %d of %d shards already done, resuming", self.root, len(complete),
                        len(counts))
        with tqdm(total=self.plan.num_examples, initial=sum(counts[i] for i in complete), unit="img",
                  desc=f"caching latents into {self.root}") as progress:
            for i in todo:
                self._encode_shard(i, counts[i], progress)
        return self.root
