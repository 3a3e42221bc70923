"""Streaming image-caption pairs from webdataset tar shards (LAION-style: ``<key>.jpg`` + ``<key>.txt``).

Shards are split disjointly across ranks (``torch.distributed`` when initialised, else the ``RANK`` and
``WORLD_SIZE`` environment variables) and DataLoader workers: consumer ``c`` of ``C`` reads shards
``c, c + C, ...``; with fewer shards than consumers every consumer reads all shards and keeps every ``C``-th
sample instead. Corrupt images, samples without an image and truncated shards are skipped, logged and counted
(``skipped`` samples, ``skipped_shards``; per process). URLs may use brace expansion
(``data/shard-{000000..000127}.tar``) and any scheme of ``webdataset.gopen`` (files, ``pipe:``, http).
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.base import Interpolation, SquareCrop, UnusableImage, open_image, to_model_image
from ldm.distributed import rank_and_world_size

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "caption", "text", "json")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard URLs from brace patterns; a string may join several patterns with "::" as webdataset does."""
    patterns = urls.split("::") if isinstance(urls, str) else list(urls)
    return [u for pattern in patterns for u in braceexpand(pattern)]


def consumer_index() -> tuple[int, int]:
    """(index, count) of this (rank, DataLoader worker) among all consumers of the stream."""
    rank, world = rank_and_world_size()
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


def tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of consecutive files sharing a key (the path up to the first dot of the name).

    :raises tarfile.TarError, OSError, EOFError: on a corrupt or truncated shard (after the complete samples).
    """
    from webdataset import gopen

    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            head, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot or stem.startswith("_"):
                continue
            sample_key = f"{head}/{stem}" if head else stem
            if sample_key != key:
                if files:
                    yield key, files
                key, files = sample_key, {}
            handle = tar.extractfile(member)
            files[ext.lower()] = handle.read() if handle is not None else b""
        if files:
            yield key, files


def _caption(files: dict[str, bytes], keys: Sequence[str]) -> str | None:
    for key in keys:
        if key in files:
            text = files[key].decode("utf-8", errors="replace")
            if key == "json":
                record = json.loads(text)
                return str(record.get("caption", record.get("text", "")))
            return text.strip()
    return None


class WebImageCaptionDataset(IterableDataset):
    """Yields ``image`` float32 [size, size, 3] in [-1, 1], ``caption`` (str; "" when a sample has none),
    ``__key__`` and ``__url__``.

    :param urls: shard URL(s) with optional brace patterns.
    :param size: output side (square crop, then resize); None keeps the short side.
    :param random_crop: random instead of centre crop position.
    :param flip_p: horizontal flip probability.
    :param min_crop_f: smallest crop side as a fraction of the short side.
    :param max_crop_f: largest crop side as a fraction of the short side.
    :param interpolation: resampling filter name.
    :param image_keys: file extensions tried, in order, for the image.
    :param caption_keys: extensions tried for the caption ("json": its "caption" or "text" field).
    :param shuffle_buffer: samples held for shuffling (0: stream order).
    :param seed: None: a fresh order and augmentation every pass; an int: fixed by seed, epoch and consumer.
    :param min_image_size: smaller images are skipped and counted.
    """

    def __init__(self, urls: str | Sequence[str], size: int | None = 256, random_crop: bool = False,
                 flip_p: float = 0.0, min_crop_f: float = 1.0, max_crop_f: float = 1.0,
                 interpolation: str = "bicubic", image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_keys: Sequence[str] = CAPTION_KEYS, shuffle_buffer: int = 0, seed: int | None = None,
                 min_image_size: int = 8) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"WebImageCaptionDataset: {len(missing)} of {len(self.urls)} shards do not "
                                    f"exist, e.g. {missing[:3]}")
        self.transform = SquareCrop(size=size, random_crop=random_crop, min_crop_f=min_crop_f,
                                    max_crop_f=max_crop_f, flip_p=flip_p,
                                    interpolation=Interpolation.parse(interpolation))
        self.image_keys, self.caption_keys = tuple(image_keys), tuple(caption_keys)
        self.shuffle_buffer, self.seed, self.min_image_size = shuffle_buffer, seed, min_image_size
        self.epoch = 0
        self.skipped = 0
        self.skipped_shards = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the shuffling of a seeded dataset from one epoch to the next."""
        self.epoch = epoch

    def _rng(self, consumer: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(2 ** 62, ())))
        return np.random.default_rng([self.seed, self.epoch, consumer])

    def _my_samples(self, consumer: int, consumers: int, rng: np.random.Generator
                    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        by_shard = len(self.urls) >= consumers
        shards = self.urls[consumer::consumers] if by_shard else list(self.urls)
        if not by_shard and consumer == 0:
            logger.warning("WebImageCaptionDataset: %d shards for %d consumers (ranks x workers): every consumer "
                           "reads all shards and keeps 1/%d of the samples", len(self.urls), consumers, consumers)
        if self.shuffle_buffer > 0:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        count = 0
        for url in shards:
            try:
                for key, files in tar_samples(url):
                    if by_shard or count % consumers == consumer:
                        yield url, key, files
                    count += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                self.skipped_shards += 1
                logger.warning("WebImageCaptionDataset: shard %s is corrupt or truncated after %d samples (%s); "
                               "going on with the next shard", url, count, e)

    def _decode(self, url: str, key: str, files: dict[str, bytes], rng: np.random.Generator) -> dict[str, Any] | None:
        name = f"{url}:{key}"
        image_key = next((k for k in self.image_keys if k in files), None)
        try:
            if image_key is None:
                raise UnusableImage(f"{name}: no image (looked for {list(self.image_keys)}, found {sorted(files)})")
            image = open_image(files[image_key], min_image_size=self.min_image_size, name=name)
            caption = _caption(files, self.caption_keys)
        except (UnusableImage, ValueError) as e:
            self.skipped += 1
            logger.warning("WebImageCaptionDataset: skipping %s (%d skipped so far)", e, self.skipped)
            return None
        return {"image": to_model_image(self.transform(image, rng)), "caption": caption or "",
                "__key__": key, "__url__": url}

    def _shuffled(self, samples: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        """Buffer shuffling of the (still encoded) samples."""
        if self.shuffle_buffer <= 0:
            yield from samples
            return
        buffer: list[Any] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = consumer_index()
        rng = self._rng(consumer)
        for url, key, files in self._shuffled(self._my_samples(consumer, consumers, rng), rng):
            item = self._decode(url, key, files, rng)
            if item is not None:
                yield item
