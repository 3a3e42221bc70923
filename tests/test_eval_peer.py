"""Our FID and KID equal torch-fidelity's on the same feature arrays, with the same KID parameters.

torch-fidelity 0.3 (the `test` extra; 0.4 installs a top-level `tests` package that hides ours) computes both
from features through ``fid_features_to_statistics`` / ``fid_statistics_to_metric`` (pytorch-fid's formula,
scipy's sqrtm) and ``kid_features_to_metric``; both sides get the very same arrays. The features
are synthetic stand-ins for Inception pool features (non-negative, correlated, low rank), in the two regimes
that matter: fewer images than dimensions (the demo: 128 samples of 2048-d features, a singular covariance)
and more images than dimensions (full-rank covariances).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from ldm.evaluation import FeatureStats, fid_from_stats, frechet_distance, frechet_distance_from_features
from ldm.evaluation.kid import kid

# torch-fidelity 0.3 passes scipy's deprecated `disp` argument to sqrtm; nothing for us to act on
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def pool_like_features(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0,
                       rank: int = 48) -> np.ndarray:
    """[n x dim] float64: rectified low-rank Gaussian features with mean about 0.3 (like Inception pool features)."""
    basis = rng.normal(size=(rank, dim)) / np.sqrt(rank)
    return np.maximum(0.5 * rng.normal(size=(n, rank)) @ basis + 0.3 + shift, 0.0)


def peer_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (f1, f2)]
    return fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID]


def peer_kid(f1: np.ndarray, f2: np.ndarray, **kwargs) -> tuple[float, float]:
    out = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), verbose=False, **kwargs)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


@pytest.fixture(scope="module")
def few_images() -> tuple[np.ndarray, np.ndarray]:
    """128 vs 128 images of 512-d features: singular covariances, as with the demo's 128 samples."""
    rng = np.random.default_rng(0)
    return pool_like_features(rng, 128, 512), pool_like_features(rng, 128, 512, shift=0.05)


@pytest.fixture(scope="module")
def many_images() -> tuple[np.ndarray, np.ndarray]:
    """400 vs 300 images of 32-d features: full-rank covariances."""
    rng = np.random.default_rng(1)
    return pool_like_features(rng, 400, 32, rank=32), pool_like_features(rng, 300, 32, shift=0.1, rank=32)


def test_fid_equals_torch_fidelity_with_full_rank_covariances(many_images):
    f1, f2 = many_images
    expected = peer_fid(f1, f2)
    a, b = FeatureStats.from_features(f1, "x"), FeatureStats.from_features(f2, "x")
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-10)
    assert float(fid_from_stats(a, b)) == pytest.approx(expected, rel=1e-6)  # FeatureStats keeps float32 features


def test_fid_equals_torch_fidelity_with_fewer_images_than_dimensions(few_images):
    f1, f2 = few_images
    expected = peer_fid(f1, f2)
    a, b = FeatureStats.from_features(f1, "x"), FeatureStats.from_features(f2, "x")
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(expected, rel=1e-10)
    # The feature path (the one fid_from_stats takes here) is exact; the square root of the singular product
    # S1 S2 (ours on statistics, and the peer's) adds sqrt(round-off) for each of its ~380 zero eigenvalues:
    # a relative difference of about 1e-7.
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert float(fid_from_stats(a, b)) == pytest.approx(expected, rel=1e-6)


def test_fid_on_float32_features_matches_to_float32_precision(few_images):
    f1, f2 = (f.astype(np.float32) for f in few_images)
    a, b = FeatureStats.from_features(f1, "x"), FeatureStats.from_features(f2, "x")
    assert float(fid_from_stats(a, b)) == pytest.approx(peer_fid(f1, f2), rel=1e-5)


def test_kid_defaults_are_torch_fidelitys():
    params = inspect.signature(kid).parameters
    assert params["subsets"].default == DEFAULTS["kid_subsets"]
    assert params["subset_size"].default == DEFAULTS["kid_subset_size"]
    assert params["degree"].default == DEFAULTS["kid_degree"]
    assert params["gamma"].default == DEFAULTS["kid_gamma"]
    assert params["coef"].default == DEFAULTS["kid_coef0"]
    assert params["seed"].default == DEFAULTS["rng_seed"]


@pytest.mark.parametrize("subsets,subset_size,degree,gamma,coef,seed", [
    (20, 100, 3, None, 1.0, 2020),
    (7, 64, 2, None, 1.0, 0),
    (5, 120, 3, 0.01, 0.5, 11),
])
def test_kid_equals_torch_fidelity(few_images, many_images, subsets, subset_size, degree, gamma, coef, seed):
    peer_args = dict(kid_subsets=subsets, kid_subset_size=subset_size, kid_degree=degree, kid_gamma=gamma,
                     kid_coef0=coef, rng_seed=seed)
    for f1, f2 in (few_images, many_images):
        mean, std = kid(f1, f2, subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma, coef=coef,
                        seed=seed)
        peer_mean, peer_std = peer_kid(f1, f2, **peer_args)
        assert mean == pytest.approx(peer_mean, rel=1e-10) and std == pytest.approx(peer_std, rel=1e-8)
        assert std > 0  # different subsets were drawn: the agreement is not that of one subset


def test_kid_of_whole_sets_equals_torch_fidelitys_permuted_subsets(few_images):
    # With subset_size = N1 = N2 every subset is a permutation of the whole sets; we compute it once.
    f1, f2 = few_images
    mean, std = kid(f1, f2, subset_size=128)
    peer_mean, peer_std = peer_kid(f1, f2, kid_subsets=10, kid_subset_size=128)
    assert mean == pytest.approx(peer_mean, rel=1e-10) and std == 0.0 and peer_std < 1e-12


def test_kid_on_float32_features_matches_to_float32_precision(few_images):
    f1, f2 = (f.astype(np.float32) for f in few_images)
    mean, _ = kid(f1, f2, subsets=10, subset_size=100)
    assert mean == pytest.approx(peer_kid(f1, f2, kid_subsets=10, kid_subset_size=100)[0], rel=1e-4)
