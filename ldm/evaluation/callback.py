"""A Lightning callback that samples a few images every N training steps and logs their FID.

With a few hundred samples the value is biased upwards (FID falls with the sample count); it tracks progress
within one run, it is not a number to compare with papers.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ldm.evaluation.features import FeatureStats, extract_features, reference_stats
from ldm.evaluation.fid import fid_from_stats
from ldm.evaluation.images import images_from_dataset, to_uint8_nhwc
from ldm.evaluation.inception import ExtractorKind, FeatureExtractor, load_extractor
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

SampleFn = Callable[[pl.LightningModule, int], Any]


class FIDCallback(pl.Callback):
    """Logs ``val/fid`` (by default) every `every_n_steps` optimiser steps.

    Samples come from ``pl_module.sample_images(n)`` when the module has it, else from `sample_fn(pl_module, n)`;
    either returns an image batch: [N x 3 x H x W] float in [-1, 1], or uint8 [N x H x W x 3].

    :param every_n_steps: compute at global steps that are multiples of this (never at step 0).
    :param num_samples: images sampled per evaluation.
    :param reference: a statistics ``.npz``, an image folder or ``.npz``, a uint8 [N x H x W x 3] array, a dataset
        whose items hold ``image`` (as ``ldm.data``), or a config (``target``/``params``) of such a dataset.
    :param num_reference: use at most this many dataset items as the reference (None: all).
    :param sample_fn: a callable, or the dotted name of one (from YAML configs).
    :param sample_batch_size: images requested per call of the sampler.
    :param extractor: a :class:`FeatureExtractor`, or ``auto``/``standard``/``bundled`` (loaded on first use).
    :param inception_weights: path of the standard FID Inception weights (see ``load_extractor``).
    :param cache_dir: where reference statistics are cached.
    :param log_name: the logged key.
    """

    def __init__(self, every_n_steps: int, num_samples: int, reference: str | Path | np.ndarray | Dataset | Mapping,
                 num_reference: int | None = None, sample_fn: SampleFn | str | None = None, sample_batch_size: int = 50,
                 extractor: FeatureExtractor | str = "auto", inception_weights: str | None = None,
                 cache_dir: str | None = None, log_name: str = "val/fid"):
        super().__init__()
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"FIDCallback needs every_n_steps >= 1 and num_samples >= 2, got {every_n_steps}, "
                             f"{num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        if isinstance(reference, Mapping) and "target" in reference:
            reference = instantiate_from_config(reference)
        if isinstance(reference, Dataset):
            reference = images_from_dataset(reference, limit=num_reference)
        self.reference = reference
        self.sample_fn = get_obj_from_str(sample_fn) if isinstance(sample_fn, str) else sample_fn
        self.sample_batch_size = sample_batch_size
        self.extractor = extractor if isinstance(extractor, FeatureExtractor) else None
        self.extractor_kind = None if self.extractor is not None else ExtractorKind(extractor)
        self.inception_weights = inception_weights
        self.cache_dir = cache_dir
        self.log_name = log_name
        self.history: list[tuple[int, float]] = []
        self._ref: FeatureStats | None = None
        self._last_step = -1

    def _sample(self, pl_module: pl.LightningModule) -> np.ndarray:
        sampler = getattr(pl_module, "sample_images", None)
        if sampler is None and self.sample_fn is None:
            raise AttributeError(f"FIDCallback: {type(pl_module).__name__} has no sample_images(n) method; pass "
                                 f"sample_fn (a callable (pl_module, n) -> images) to the callback")
        batches, remaining = [], self.num_samples
        while remaining > 0:
            n = min(self.sample_batch_size, remaining)
            out = sampler(n) if sampler is not None else self.sample_fn(pl_module, n)
            batches.append(to_uint8_nhwc(out))
            remaining -= len(batches[-1])
        return np.concatenate(batches)[:self.num_samples]

    def compute_fid(self, pl_module: pl.LightningModule) -> float:
        """Samples `num_samples` images from the module and returns their FID against the reference."""
        if self.extractor is None:
            self.extractor = load_extractor(self.extractor_kind, self.inception_weights, device=pl_module.device)
        if self._ref is None:
            self._ref = reference_stats(self.reference, self.extractor, cache_dir=self.cache_dir, progress=False)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = self._sample(pl_module)
        finally:
            pl_module.train(was_training)
        fake = extract_features(images, self.extractor, progress=False)
        return float(fid_from_stats(fake, self._ref))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        value = self.compute_fid(pl_module)
        self.history.append((step, value))
        logger.info("step %d: %s = %.4f over %d samples [%s]", step, self.log_name, value, self.num_samples,
                    self.extractor.name)
        pl_module.log(self.log_name, value, on_step=True, on_epoch=False, rank_zero_only=True)
