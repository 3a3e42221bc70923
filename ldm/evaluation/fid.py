"""Frechet Inception Distance (Heusel et al. 2017).

``FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussian fits of two feature sets.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from ldm.evaluation.features import FeatureStats, extract_features, reference_stats
from ldm.evaluation.inception import FeatureExtractor, load_extractor

logger = logging.getLogger(__name__)


class Score(float):
    """A metric value (a float) that remembers the feature extractor it was computed with."""

    extractor: str
    metric: str

    def __new__(cls, value: float, metric: str, extractor: str) -> "Score":
        obj = super().__new__(cls, value)
        obj.metric = metric
        obj.extractor = extractor
        return obj

    def __reduce__(self) -> tuple:
        return (Score, (float(self), self.metric, self.extractor))

    def describe(self) -> str:
        """E.g. ``FID 12.3456 [fid-inception-2015 (standard)]``."""
        return f"{self.metric} {float(self):.4f} [{self.extractor}]"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    :param mu1: [D] mean; :param sigma1: [D x D] covariance (likewise mu2, sigma2).
    :param eps: added to the diagonals when the product of the covariances is singular.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(f"FID: the matrix square root has a large imaginary part ({max_imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Frechet distance between Gaussian fits of two feature sets, exactly, without a [D x D] square root.

    With A_i the centred features scaled by 1/sqrt(N_i - 1) (so S_i = A_i^T A_i), the nonzero eigenvalues of
    S1 S2 are the squared singular values of A1 A2^T, so Tr (S1 S2)^(1/2) is the nuclear norm of the
    [N1 x N2] matrix A1 A2^T: fast and stable when N1, N2 are small next to D (e.g. a few hundred images).

    :param features1: [N1 x D]; :param features2: [N2 x D] (N1, N2 >= 2).
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need [N x D] feature arrays with the same D and N >= 2, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1 = (f1 - mu1) / np.sqrt(len(f1) - 1)
    a2 = (f2 - mu2) / np.sqrt(len(f2) - 1)
    diff = mu1 - mu2
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2.0 * nuclear)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> Score:
    """FID between two :class:`FeatureStats`, tagged with the extractor name.

    Uses :func:`frechet_distance_from_features` when both carry features and N1 * N2 <= D^2 (same value,
    much faster), else :func:`frechet_distance` on the statistics.
    """
    names = {a.extractor, b.extractor}
    if len(names) > 1:
        logger.warning("FID between statistics from different extractors: %s", sorted(names))
    dim = a.mu.shape[0]
    if a.features is not None and b.features is not None and len(a.features) * len(b.features) <= dim * dim:
        value = frechet_distance_from_features(a.features, b.features)
    else:
        value = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return Score(value, "FID", " / ".join(sorted(names)))


def compute_fid(samples: str | Path | np.ndarray | torch.Tensor, reference: str | Path | np.ndarray | torch.Tensor,
                extractor: FeatureExtractor | None = None, batch_size: int = 50,
                cache_dir: str | Path | None = None, progress: bool | None = None) -> Score:
    """FID between a sample set and a reference set.

    :param samples: uint8 [N x H x W x 3] images (or NCHW / float in [-1, 1], see ``to_uint8_nhwc``), a folder
        or an ``.npz``.
    :param reference: the same kinds, or a statistics ``.npz`` (``mu``/``sigma``).
    :param extractor: default: :func:`~ldm.evaluation.inception.load_extractor` (standard weights if cached,
        else the bundled network).
    :param cache_dir: cache for the reference statistics.
    :return: the FID as a :class:`Score` (a float with ``.extractor``).
    """
    extractor = extractor if extractor is not None else load_extractor()
    ref = reference_stats(reference, extractor, cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    fake = extract_features(samples, extractor, batch_size=batch_size, progress=progress)
    score = fid_from_stats(fake, ref)
    logger.info("%s", score.describe())
    return score
