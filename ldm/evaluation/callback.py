"""A Lightning callback that samples a few images every N training steps and logs their FID.

A DDPM or LatentDiffusion is sampled through the one sampling path (``model.sample_images``) with the configured
sampler, guidance scale and EMA weights; a conditional model takes its conditions (captions, class labels, ...)
from the items of the reference dataset, in order. With a few hundred samples the value is biased upwards (FID
falls with the sample count); it tracks progress within one run, it is not a number to compare with papers.
In a config::

    lightning:
      callbacks:
        fid:
          target: ldm.evaluation.callback.FIDCallback
          params:
            every_n_steps: 500
            num_samples: 256
            reference: {target: ldm.data.emoji.EmojiDataset, params: {size: 32, split: validation}}
            sampling: {sampler: ddim, steps: 25}
            guidance_scale: 3.0
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, default_collate

from ldm.evaluation.features import FeatureStats, extract_features, reference_stats
from ldm.evaluation.fid import fid_from_stats
from ldm.evaluation.images import images_from_dataset, to_uint8_nhwc
from ldm.evaluation.inception import ExtractorKind, FeatureExtractor, load_extractor
from ldm.models.diffusion.base import DiffusionModule
from ldm.models.diffusion.sampling import SamplingOptions
from ldm.util import get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

SampleFn = Callable[[pl.LightningModule, int], Any]


class FIDCallback(pl.Callback):
    """Logs ``val/fid`` (by default) every `every_n_steps` optimiser steps.

    Samples come from `sample_fn(pl_module, n)` when given, else from ``pl_module.sample_images``: for a
    DDPM/LatentDiffusion with the `sampling` options, `guidance_scale`, `use_ema` and a batch of conditions,
    for any other module as ``sample_images(n)``. Either returns an image batch: [N x 3 x H x W] float in
    [-1, 1], or uint8 [N x H x W x 3]. The noise is drawn from a generator seeded with `seed` (the same at every
    evaluation, and the training's random state is left as it was).

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
    :param sampling: :class:`~ldm.models.diffusion.sampling.SamplingOptions` (or their keyword arguments) for
        diffusion models; default DDIM, 50 steps.
    :param guidance_scale: classifier-free guidance scale of conditional diffusion models (1: none).
    :param use_ema: sample diffusion models with their EMA weights (when they keep them).
    :param conditions: a dataset (or its config) whose items condition the samples of a conditional model;
        default: the reference dataset.
    :param seed: seed of the sampling noise.
    """

    def __init__(self, every_n_steps: int, num_samples: int, reference: str | Path | np.ndarray | Dataset | Mapping,
                 num_reference: int | None = None, sample_fn: SampleFn | str | None = None, sample_batch_size: int = 50,
                 extractor: FeatureExtractor | str = "auto", inception_weights: str | None = None,
                 cache_dir: str | None = None, log_name: str = "val/fid",
                 sampling: SamplingOptions | Mapping[str, Any] | None = None, guidance_scale: float = 1.0,
                 use_ema: bool = True, conditions: Dataset | Mapping | None = None, seed: int = 0):
        super().__init__()
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"FIDCallback needs every_n_steps >= 1 and num_samples >= 2, got {every_n_steps}, "
                             f"{num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        if isinstance(reference, Mapping) and "target" in reference:
            reference = instantiate_from_config(reference)
        if isinstance(conditions, Mapping) and "target" in conditions:
            conditions = instantiate_from_config(conditions)
        self.conditions = conditions if conditions is not None else (reference if isinstance(reference, Dataset)
                                                                     else None)
        if isinstance(reference, Dataset):
            reference = images_from_dataset(reference, limit=num_reference)
        self.reference = reference
        self.sampling = sampling if isinstance(sampling, SamplingOptions) else SamplingOptions(**dict(sampling or {}))
        self.guidance_scale = guidance_scale
        self.use_ema = use_ema
        self.seed = seed
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

    def _sampler(self, pl_module: pl.LightningModule) -> Callable[[int, int], Any]:
        """``(start, n) -> images``: samples number start .. start + n - 1 of an evaluation."""
        if self.sample_fn is not None:
            return lambda start, n: self.sample_fn(pl_module, n)
        if isinstance(pl_module, DiffusionModule):
            return lambda start, n: pl_module.sample_images(
                n, batch=self._conditions(start, n), options=self.sampling, guidance_scale=self.guidance_scale,
                use_ema=self.use_ema)
        if callable(getattr(pl_module, "sample_images", None)):
            return lambda start, n: pl_module.sample_images(n)
        raise AttributeError(f"FIDCallback: {type(pl_module).__name__} has no sample_images(n) method; pass "
                             f"sample_fn (a callable (pl_module, n) -> images) to the callback")

    def _conditions(self, start: int, n: int) -> Any:
        """The collated items start .. start + n - 1 (cycling) of the conditions dataset, or None."""
        if self.conditions is None:
            return None
        return default_collate([self.conditions[i % len(self.conditions)] for i in range(start, start + n)])

    def _sample(self, pl_module: pl.LightningModule) -> np.ndarray:
        sampler = self._sampler(pl_module)
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        batches, done = [], 0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            while done < self.num_samples:
                n = min(self.sample_batch_size, self.num_samples - done)
                batches.append(to_uint8_nhwc(sampler(done, n)))
                done += len(batches[-1])
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
