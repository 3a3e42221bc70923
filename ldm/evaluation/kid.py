"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel."""
from __future__ import annotations

import numpy as np


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """The unbiased MMD^2 between two samples with the kernel k(a, b) = (a.b / D + coef)^degree.

    :param x: [M x D]; :param y: [M' x D] (M, M' >= 2).
    """
    d = x.shape[1]
    kxx = (x @ x.T / d + coef) ** degree
    kyy = (y @ y.T / d + coef) ** degree
    kxy = (x @ y.T / d + coef) ** degree
    m, n = len(x), len(y)
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: the mean and standard deviation of :func:`polynomial_mmd2` over random subsets.

    :param features1: [N1 x D]; :param features2: [N2 x D].
    :param subset_size: images per subset, reduced to min(N1, N2) when larger (with a single subset then, as
        all subsets would be the same).
    :return: (mean, std) over the subsets.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need [N x D] feature arrays with the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}")
    if m == len(f1) == len(f2):
        subsets = 1
    rng = np.random.default_rng(seed)
    values = np.array([polynomial_mmd2(f1[rng.choice(len(f1), m, replace=False)],
                                       f2[rng.choice(len(f2), m, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())
