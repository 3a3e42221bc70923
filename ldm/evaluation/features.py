"""Batched feature extraction over image sets, and feature statistics cached to disk.

A :class:`FeatureStats` holds the Inception features of one image set (for KID and precision/recall), their
mean and covariance (for FID), the logits when the extractor has them (for IS) and the extractor's name.
Reference statistics are cached as ``.npz`` files keyed by a hash of the image set and the extractor.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.evaluation.images import ImageSource, open_images
from ldm.evaluation.inception import FeatureExtractor

logger = logging.getLogger(__name__)

UNKNOWN_EXTRACTOR = "unknown (precomputed statistics)"
MEMORY_CACHE_SIZE = 8

# Reference statistics computed in this process, so repeated evaluations against one reference (a training
# run's callback, a demo comparing several sample sets) extract its features once.
_memory_cache: dict[tuple[str, str, int, int | None], "FeatureStats"] = {}


@dataclass
class FeatureStats:
    """Statistics of the features of an image set.

    mu: [D] float64; sigma: [D x D] float64; features: [N x D] float32 or None (statistics-only files);
    logits: [N x K] float32 or None; extractor: the name of the network; n: the number of images;
    n_skipped: unreadable files skipped.
    """

    mu: np.ndarray
    sigma: np.ndarray
    extractor: str
    n: int
    features: np.ndarray | None = None
    logits: np.ndarray | None = None
    n_skipped: int = 0

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: str, logits: np.ndarray | None = None,
                      n_skipped: int = 0) -> "FeatureStats":
        """Statistics of [N x D] features (N >= 2: the covariance is the unbiased sample covariance)."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need an [N x D] feature array with N >= 2 images, got shape {feats.shape}")
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), extractor=extractor,
                   n=feats.shape[0], features=np.asarray(features, dtype=np.float32), logits=logits,
                   n_skipped=n_skipped)

    def save(self, path: str | Path) -> None:
        """Writes an ``.npz`` with mu, sigma, extractor, n and (when present) features and logits."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "extractor": np.array(self.extractor), "n": np.array(self.n)}
        if self.features is not None:
            arrays["features"] = self.features
        if self.logits is not None:
            arrays["logits"] = self.logits
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        """Reads statistics written by :meth:`save`, or any ``.npz`` with ``mu`` and ``sigma`` (e.g. ADM's)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file not found: {path}")
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise KeyError(f"{path} is not a statistics file: it has no 'mu' and 'sigma' arrays "
                               f"(it holds {list(data.keys())})")
            extractor = str(data["extractor"]) if "extractor" in data else UNKNOWN_EXTRACTOR
            features = data["features"] if "features" in data else None
            return cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                       extractor=extractor, n=int(data["n"]) if "n" in data else -1, features=features,
                       logits=data["logits"] if "logits" in data else None)


def is_stats_file(path: str | Path) -> bool:
    """Whether `path` is an ``.npz`` holding ``mu`` and ``sigma`` (statistics rather than images)."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file():
        return False
    with np.load(path) as data:
        return "mu" in data and "sigma" in data


@torch.no_grad()
def extract_features(source: ImageSource | str | Path | np.ndarray | torch.Tensor, extractor: FeatureExtractor,
                     batch_size: int = 50, limit: int | None = None, progress: bool | None = None) -> FeatureStats:
    """Runs `extractor` over an image set in batches.

    :param source: an :class:`ImageSource`, or anything :func:`~ldm.evaluation.images.open_images` accepts
        (a folder, an ``.npz``, a uint8 [N x H x W x 3] array).
    :param limit: use at most this many images.
    :param progress: show a tqdm bar (None: only on a terminal).
    """
    if not isinstance(source, ImageSource):
        source = open_images(source)
    total = len(source) if limit is None else min(limit, len(source))
    feats, logits = [], []
    with tqdm(total=total, desc=f"Inception features of {source.description}", unit="img",
              disable=False if progress else None if progress is None else True) as bar:
        for batch in source.batches(batch_size, limit):
            out = extractor(torch.from_numpy(batch).permute(0, 3, 1, 2))
            feats.append(out.features.float().cpu().numpy())
            if out.logits is not None:
                logits.append(out.logits.float().cpu().numpy())
            bar.update(len(batch))
    if not feats:
        raise ValueError(f"no readable images in {source.description} ({len(source.skipped)} skipped)")
    return FeatureStats.from_features(np.concatenate(feats), extractor.name,
                                      logits=np.concatenate(logits) if logits else None,
                                      n_skipped=len(source.skipped))


def reference_stats(source: str | Path | np.ndarray | torch.Tensor, extractor: FeatureExtractor,
                    cache_dir: str | Path | None = None, batch_size: int = 50, limit: int | None = None,
                    progress: bool | None = None, size: tuple[int, int] | None = None) -> FeatureStats:
    """Statistics of a reference set, read from / written to a cache.

    :param source: a statistics ``.npz`` (returned as is), an image folder, an image ``.npz`` or an array.
    :param cache_dir: where computed statistics are kept, as ``<hash of images + extractor>.npz``; None: no
        disk cache. Within a process, the statistics of the last few references are also kept in memory.
    """
    if isinstance(source, (str, Path)) and is_stats_file(source):
        stats = FeatureStats.load(source)
        if stats.extractor not in (extractor.name, UNKNOWN_EXTRACTOR):
            raise ValueError(f"statistics {source} were computed with '{stats.extractor}', not with the "
                             f"current extractor '{extractor.name}'")
        return stats
    images = open_images(source, size=size)
    fingerprint = images.fingerprint()
    memo_key = (fingerprint, extractor.name, id(extractor), limit)
    cache_path = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{fingerprint}|{extractor.name}|{limit}".encode()).hexdigest()[:20]
        cache_path = Path(cache_dir) / f"ref-stats-{key}.npz"
    if memo_key in _memory_cache:
        stats = _memory_cache[memo_key]
    elif cache_path is not None and cache_path.is_file():
        logger.info("reference statistics of %s read from the cache %s", images.description, cache_path)
        return _remember(memo_key, FeatureStats.load(cache_path))
    else:
        stats = _remember(memo_key, extract_features(images, extractor, batch_size=batch_size, limit=limit,
                                                     progress=progress))
    if cache_path is not None and not cache_path.is_file():
        stats.save(cache_path)
        logger.info("reference statistics of %s cached in %s", images.description, cache_path)
    return stats


def _remember(key: tuple[str, str, int, int | None], stats: FeatureStats) -> FeatureStats:
    """Keeps `stats` in the in-process cache (the oldest entry goes when it is full)."""
    if len(_memory_cache) >= MEMORY_CACHE_SIZE:
        _memory_cache.pop(next(iter(_memory_cache)))
    _memory_cache[key] = stats
    return stats
