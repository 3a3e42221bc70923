"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with a polynomial kernel.

The defaults (100 subsets of 1000 features, kernel ``(a.b / D + 1)^3``) and the subset draw (a
``numpy.random.RandomState(seed)`` choosing the first set's subset, then the second's, without replacement) are
those of torch-fidelity, so that :func:`kid` with the same parameters and seed gives its numbers.
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SEED = 2020  # torch-fidelity's default rng_seed


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                    coef: float = 1.0) -> float:
    """The unbiased MMD^2 between two samples with the kernel k(a, b) = (gamma a.b + coef)^degree.

    :param x: [M x D]; :param y: [M' x D] (M, M' >= 2).
    :param gamma: default 1 / D.
    """
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * gamma + coef) ** degree
    kyy = (y @ y.T * gamma + coef) ** degree
    kxy = (x @ y.T * gamma + coef) ** degree
    m, n = len(x), len(y)
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2.0 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef: float = 1.0,
        seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """KID: the mean and standard deviation (numpy's, ddof 0) of :func:`polynomial_mmd2` over random subsets.

    :param features1: [N1 x D]; :param features2: [N2 x D] (computed in float64).
    :param subsets: number of subset pairs; :param subset_size: features per subset, drawn without replacement.
        When a set has fewer features, the size is reduced to min(N1, N2) with a warning (torch-fidelity refuses
        such input), and a single subset is used when that takes both whole sets (all subsets would be equal).
    :param degree, gamma, coef: the kernel (gamma a.b + coef)^degree; gamma defaults to 1 / D.
    :param seed: seed of the subset draw.
    :return: (mean, std) over the subsets.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need [N x D] feature arrays with the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(f1)} and {len(f2)}")
    if m < subset_size:
        logger.warning("KID: subset size %d reduced to %d (the smaller set); numbers at different subset sizes "
                       "are not comparable", subset_size, m)
    if m == len(f1) == len(f2):
        subsets = 1
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        values[i] = polynomial_mmd2(x, y, degree=degree, gamma=gamma, coef=coef)
    return float(values.mean()), float(values.std())
