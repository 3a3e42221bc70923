"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits."""
from __future__ import annotations

import numpy as np
import torch


def inception_score(logits_or_probs: np.ndarray | torch.Tensor, splits: int = 10,
                    is_probs: bool = False) -> tuple[float, float]:
    """The Inception Score of class predictions.

    :param logits_or_probs: [N x K] class logits (softmax applied here) or, with `is_probs`, probabilities.
    :param splits: the predictions are cut into this many equal parts (as the original code); the score is
        computed on each.
    :return: (mean, std) over the splits. Uniform predictions give 1; confident predictions spread evenly over
        K classes give K.
    """
    x = torch.as_tensor(np.asarray(logits_or_probs), dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [N x K] logits or probabilities, got shape {tuple(x.shape)}")
    if splits < 1 or x.shape[0] < splits:
        raise ValueError(f"need at least one prediction per split: {x.shape[0]} predictions, {splits} splits")
    if is_probs:
        if (x < 0).any() or not torch.allclose(x.sum(1), torch.ones(x.shape[0], dtype=x.dtype), atol=1e-4):
            raise ValueError("probabilities must be non-negative and sum to 1 per row")
        log_p = torch.log(x.clamp_min(1e-30))
    else:
        log_p = torch.log_softmax(x, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))
