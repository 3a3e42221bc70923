"""The evaluation suites behind ``scripts/evaluate.py``: sample metrics (FID, KID, IS, precision/recall) and
first-stage reconstruction metrics (PSNR, SSIM, LPIPS, rFID). Results are flat dicts ready for JSON.
"""
from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.checkpoint import load_state_dict
from ldm.evaluation.features import FeatureStats, extract_features, reference_stats
from ldm.evaluation.fid import fid_from_stats
from ldm.evaluation.images import open_images
from ldm.evaluation.inception import FeatureExtractor
from ldm.evaluation.inception_score import inception_score
from ldm.evaluation.kid import kid
from ldm.evaluation.prdc import precision_recall
from ldm.evaluation.reconstruction import evaluate_reconstruction, load_lpips
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class Metric(enum.Enum):
    """Sample metrics of :func:`evaluate_samples`."""

    FID = "fid"
    KID = "kid"
    IS = "is"
    PR = "pr"

    @classmethod
    def parse(cls, names: str | Sequence[str]) -> list["Metric"]:
        """``"fid,kid"`` or ``["fid", "kid"]`` -> metrics; unknown names raise a ValueError listing the valid ones."""
        items = names.split(",") if isinstance(names, str) else list(names)
        out = []
        for name in (n.strip().lower() for n in items if n.strip()):
            try:
                out.append(cls(name))
            except ValueError:
                raise ValueError(f"unknown metric {name!r}; choose from {', '.join(m.value for m in cls)}") from None
        return out


def evaluate_samples(samples: str | Path | np.ndarray, reference: str | Path | np.ndarray, extractor: FeatureExtractor,
                     metrics: Sequence[Metric] = (Metric.FID,), batch_size: int = 50,
                     cache_dir: str | Path | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     is_splits: int = 10, pr_k: int = 3, size: tuple[int, int] | None = None,
                     progress: bool | None = None) -> dict[str, Any]:
    """Computes the chosen metrics of a sample set against a reference.

    :param samples: a folder, an image ``.npz`` or a uint8 [N x H x W x 3] array.
    :param reference: the same kinds, or a statistics ``.npz`` (FID only unless it holds ``features``).
    :return: a dict with ``extractor``, counts, and per metric ``fid``; ``kid_mean``/``kid_std``;
        ``is_mean``/``is_std``; ``precision``/``recall``. A metric that cannot be computed gets None and a
        ``<metric>_unavailable`` reason.
    """
    metrics = list(metrics)
    sample_src = open_images(samples, size=size)
    fake = extract_features(sample_src, extractor, batch_size=batch_size, progress=progress)
    result: dict[str, Any] = {"extractor": extractor.name, "samples": _describe(samples), "n_samples": fake.n,
                              "n_samples_skipped": fake.n_skipped}
    ref: FeatureStats | None = None
    if any(m is not Metric.IS for m in metrics):
        ref = reference_stats(reference, extractor, cache_dir=cache_dir, batch_size=batch_size, progress=progress,
                              size=size)
        result.update(reference=_describe(reference), n_reference=ref.n)
    for metric in metrics:
        if metric is Metric.FID:
            result["fid"] = float(fid_from_stats(fake, ref))
        elif metric is Metric.IS:
            if fake.logits is None:
                result.update(is_mean=None, is_std=None, is_unavailable=f"the extractor '{extractor.name}' has no "
                              f"class logits; the Inception Score needs the standard FID Inception weights")
            else:
                splits = min(is_splits, fake.n)
                result["is_mean"], result["is_std"] = inception_score(fake.logits, splits=splits)
        elif ref.features is None:
            reason = "the reference statistics hold no features (only mu/sigma); pass images or a cached file"
            keys = ("kid_mean", "kid_std") if metric is Metric.KID else ("precision", "recall")
            result.update({k: None for k in keys}, **{f"{metric.value}_unavailable": reason})
        elif metric is Metric.KID:
            result["kid_mean"], result["kid_std"] = kid(fake.features, ref.features, subsets=kid_subsets,
                                                        subset_size=kid_subset_size)
        else:
            result["precision"], result["recall"] = precision_recall(ref.features, fake.features, k=pr_k)
    return result


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"array {tuple(np.shape(source))}"


def load_first_stage(config: Any, ckpt: str | Path | None = None) -> torch.nn.Module:
    """Builds a first-stage model from a config (``model:`` section or the model config itself) for evaluation.

    The training loss (``lossconfig``) is replaced by ``torch.nn.Identity``: evaluation does not need it, and
    the LPIPS-with-discriminator loss would need the VGG weights. The checkpoint must provide every other weight.
    """
    model_cfg = config.get("model", config)
    params = dict(model_cfg.get("params", {}))
    if "lossconfig" in params:
        params["lossconfig"] = {"target": "torch.nn.Identity"}
    model = instantiate_from_config({"target": model_cfg["target"], "params": params})
    if ckpt is not None:
        state = {k: v for k, v in load_state_dict(ckpt).items() if not k.startswith("loss.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("loss.")]
        if missing:
            raise KeyError(f"checkpoint {ckpt} lacks {len(missing)} weights of {model_cfg['target']}, e.g. "
                           f"{missing[:5]}")
        if unexpected:
            logger.warning("checkpoint %s has %d unused keys, e.g. %s", ckpt, len(unexpected), unexpected[:5])
    else:
        logger.warning("no first-stage checkpoint given: evaluating randomly initialised weights")
    return model.eval().requires_grad_(False)


def load_eval_dataset(config: Any, split: str = "validation") -> Dataset:
    """The dataset of a data config: ``data.params.<split>`` of a training config, ``params.<split>`` of a data
    module config, or a dataset config (``target``) itself."""
    cfg = config.get("data", config)
    if "params" in cfg and split in cfg["params"]:
        return instantiate_from_config(cfg["params"][split])
    if "params" in cfg and any(k in cfg["params"] for k in ("train", "validation", "test")):
        raise KeyError(f"the data config has no '{split}' split (it has {sorted(cfg['params'].keys())})")
    return instantiate_from_config(cfg)


def image_batches(dataset: Dataset, batch_size: int, image_key: str = "image",
                  num_workers: int = 0) -> Iterator[torch.Tensor]:
    """[B x 3 x H x W] float batches in [-1, 1] from a dataset whose items hold ``image`` [H x W x 3] in [-1, 1]."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        x = batch[image_key] if isinstance(batch, dict) else batch
        yield torch.as_tensor(x).permute(0, 3, 1, 2).float()


def evaluate_first_stage(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                         extractor: FeatureExtractor | None, use_lpips: bool = True,
                         lpips_random_backbone: bool = False, max_images: int | None = None,
                         progress: bool | None = None) -> dict[str, Any]:
    """PSNR/SSIM/LPIPS/rFID of a first-stage model's reconstructions as a JSON-ready dict."""
    lpips_model = load_lpips(random_backbone=lpips_random_backbone) if use_lpips else None
    res = evaluate_reconstruction(model, batches, extractor=extractor, lpips_model=lpips_model,
                                  max_images=max_images, progress=progress)
    return {"extractor": extractor.name if extractor is not None else None, "n_images": res.n, "psnr": res.psnr,
            "ssim": res.ssim, "lpips": res.lpips, "lpips_backbone": None if not use_lpips else
            ("random (not meaningful)" if lpips_random_backbone else "vgg16 imagenet"),
            "rfid": None if res.rfid is None else float(res.rfid)}
