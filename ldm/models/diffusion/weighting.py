"""Per-timestep loss weighting: the signal-to-noise ratio of a discrete schedule and min-SNR-gamma weights.

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy") weighs the
squared error of each timestep so that, expressed as an error on the clean sample x0, its weight is
``min(SNR_t, gamma)``: the low-noise steps (large SNR), whose x0 errors are tiny and dominate nothing but the
gradient conflicts, are capped at gamma.

Derivation of the weight in each parameterisation. With ``x_t = alpha x0 + sigma eps``, ``alpha^2 = a_t``,
``sigma^2 = 1 - a_t`` (``a_t = alphas_cumprod[t]``) and ``SNR_t = alpha^2 / sigma^2 = a_t / (1 - a_t)``, a
prediction ``x0_hat`` of the clean sample and the network output it corresponds to satisfy:

- eps-prediction: ``x0_hat = (x_t - sigma eps_hat) / alpha``, so ``x0_hat - x0 = -(sigma / alpha)(eps_hat - eps)``
  and ``|eps_hat - eps|^2 = SNR_t |x0_hat - x0|^2``;
- x0-prediction: the output is ``x0_hat`` itself, ``|x0_hat - x0|^2``;
- v-prediction (``v = alpha eps - sigma x0``): ``x0_hat = alpha x_t - sigma v_hat``, so
  ``x0_hat - x0 = -sigma (v_hat - v)`` and ``|v_hat - v|^2 = |x0_hat - x0|^2 / sigma^2 = (SNR_t + 1) |x0_hat - x0|^2``.

For the x0-space weight to be ``min(SNR_t, gamma)`` the squared error of the network output is therefore
weighted by ``min(SNR_t, gamma) / SNR_t`` (eps), ``min(SNR_t, gamma)`` (x0) and ``min(SNR_t, gamma) / (SNR_t + 1)``
(v). The eps weight is computed as ``min(1, gamma / SNR_t)``, which stays finite (1) at zero SNR. The identity
holds for the squared (l2) error; with an l1 loss the same weights are applied but are not x0-equivalent.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping, Protocol

import torch

from ldm.models.diffusion.parameterization import Parameterization
from ldm.util import parse_kind_config


class LossWeightingKind(str, enum.Enum):
    NONE = "none"
    MIN_SNR = "min_snr"


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio ``a / (1 - a)`` of each step of a discrete schedule.

    :param alphas_cumprod: a [T] Tensor of cumulative alpha products in (0, 1] (0 allowed at a zero-terminal-SNR end).
    :return: a [T] float64 Tensor (infinite where ``a == 1``).
    """
    a = alphas_cumprod.double()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, parameterization: str | Parameterization,
                    gamma: float = 5.0) -> torch.Tensor:
    """The min-SNR-gamma weight of each timestep's squared error of the network output (see module docstring).

    :param alphas_cumprod: the model's [T] ``alphas_cumprod`` buffer.
    :param parameterization: what the network predicts: 'eps', 'x0' or 'v'.
    :param gamma: the SNR cap, > 0 (the paper's default is 5).
    :return: a [T] float32 Tensor of weights, on the device of `alphas_cumprod`.
    :raises ValueError: naming `gamma` when it is not positive.
    """
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    p = Parameterization.parse(parameterization)
    s = snr(alphas_cumprod)
    capped = torch.clamp(s, max=gamma)
    if p is Parameterization.EPS:
        weights = torch.clamp(gamma / s, max=1.0)
    elif p is Parameterization.X0:
        weights = capped
    else:
        weights = capped / (s + 1.0)
    return weights.float()


class LossWeighting(Protocol):
    """``weighting(t, alphas_cumprod, parameterization) -> [N]`` weights of each example's simple loss
    (t: [N] long timesteps, alphas_cumprod: the model's [T] buffer)."""

    def __call__(self, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 parameterization: Parameterization) -> torch.Tensor: ...


class UnitWeighting:
    """Every example weighs 1: the plain simple loss of the original."""

    def __call__(self, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 parameterization: Parameterization) -> torch.Tensor:
        return torch.ones(t.shape[0], device=t.device)

    def __repr__(self) -> str:
        return "UnitWeighting()"


class MinSNRWeighting:
    """Min-SNR-gamma loss weights of a batch of timesteps (see the module docstring).

    :param gamma: the SNR cap, > 0.
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if not gamma > 0:
            raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 parameterization: str | Parameterization) -> torch.Tensor:
        """The [N] float32 weights of [N] long timesteps `t` under the [T] schedule `alphas_cumprod`."""
        return min_snr_weights(alphas_cumprod, parameterization, self.gamma).to(t.device)[t]

    def __repr__(self) -> str:
        return f"MinSNRWeighting(gamma={self.gamma})"


def make_loss_weighting(config: Mapping[str, Any] | str | None) -> LossWeighting:
    """The per-example loss weighting of a config; None or 'none' gives the original unweighted loss.

    :param config: None, a kind ('none', 'min_snr') or ``{"kind": "min_snr", "gamma": 5.0}``.
    :raises ValueError: naming the key for an unknown kind or parameter.
    """
    kind, params = parse_kind_config(config, LossWeightingKind, LossWeightingKind.NONE, "loss_weighting",
                                     {LossWeightingKind.NONE: (), LossWeightingKind.MIN_SNR: ("gamma",)})
    if kind is LossWeightingKind.NONE:
        return UnitWeighting()
    return MinSNRWeighting(**params)
