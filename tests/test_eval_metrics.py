"""KID, Inception Score and improved precision/recall on synthetic features with known answers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.evaluation.inception_score import inception_score
from ldm.evaluation.kid import kid, polynomial_mmd2
from ldm.evaluation.prdc import knn_radii, precision_recall


def test_kid_is_near_zero_for_one_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 0.1 and shifted_mean > 20 * abs(same_mean)


def test_polynomial_mmd2_matches_a_direct_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)) + 0.5
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 10)), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    assert inception_score(np.full((50, 4), 0.25), splits=1, is_probs=True)[0] == pytest.approx(1.0)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes():
    k = 8
    probs = np.eye(k)[np.arange(160) % k]
    assert inception_score(probs, splits=4, is_probs=True)[0] == pytest.approx(k, rel=1e-6)
    logits = 50.0 * probs  # near one-hot after softmax
    assert inception_score(logits, splits=2)[0] == pytest.approx(k, rel=1e-6)
    # Confident but always the same class: no diversity, score 1.
    assert inception_score(np.eye(k)[np.zeros(40, int)], splits=1, is_probs=True)[0] == pytest.approx(1.0)


def test_inception_score_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((4, 3)), splits=1, is_probs=True)


def test_knn_radii_exclude_the_point_itself():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(pts, k=1).numpy(), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(knn_radii(pts, k=2).numpy(), [3.0, 2.0, 3.0, 6.0])


def test_precision_recall_identical_and_disjoint_clouds():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 4))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_fake_covering_half_of_the_real_support():
    rng = np.random.default_rng(3)
    # Real: two well separated clusters; fake: only one of them (same density there).
    real = np.concatenate([rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 50.0])
    fake = rng.normal(size=(500, 2))
    precision, recall = precision_recall(real, fake, k=3, batch_size=128)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)
    # Swapping the roles swaps the metrics: the fake set then misses nothing of the real one.
    p2, r2 = precision_recall(fake, real, k=3)
    assert p2 == pytest.approx(0.5, abs=0.03) and r2 > 0.95
