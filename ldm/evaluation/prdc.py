"""Improved precision and recall (Kynkaanniemi et al. 2019) on k-nearest-neighbour feature manifolds.

Each set's manifold is the union of balls around its points, each ball's radius being the distance to the
point's k-th nearest neighbour within the set. Precision: the share of fake points inside the real manifold;
recall: the share of real points inside the fake manifold.
"""
from __future__ import annotations

import numpy as np
import torch


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1000) -> torch.Tensor:
    """[N] distances from each of the [N x D] points to its k-th nearest neighbour (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {len(features)}")
    radii = []
    for i in range(0, len(features), batch_size):
        d = torch.cdist(features[i:i + batch_size], features)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """The share of [N x D] points within at least one ball (centre [M x D], radius [M])."""
    inside = [(torch.cdist(points[i:i + batch_size], centres) <= radii[None]).any(1)
              for i in range(0, len(points), batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall.

    :param real: [N x D] reference features; :param fake: [M x D] sample features (on any device).
    :param k: the neighbourhood size (3 in the paper).
    :param batch_size: rows per block of the distance matrices (memory: batch_size x N).
    :return: (precision, recall), each in [0, 1].
    """
    real_t = torch.as_tensor(real).double()
    fake_t = torch.as_tensor(fake).double().to(real_t.device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"need [N x D] feature arrays with the same D, got {tuple(real_t.shape)} and "
                         f"{tuple(fake_t.shape)}")
    precision = _coverage(fake_t, real_t, knn_radii(real_t, k, batch_size), batch_size)
    recall = _coverage(real_t, fake_t, knn_radii(fake_t, k, batch_size), batch_size)
    return precision, recall
