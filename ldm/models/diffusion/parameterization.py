"""What the network predicts (eps, x0 or v) and the conversions between the three, for the loss and samplers.

With x_t = alpha_t * x0 + sigma_t * eps (alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t)):
eps-prediction outputs eps, x0-prediction outputs x0, v-prediction outputs v = alpha_t * eps - sigma_t * x0.
"""
from __future__ import annotations

import enum

import torch

from ldm.util import parse_enum


class Parameterization(str, enum.Enum):
    EPS = "eps"
    X0 = "x0"
    V = "v"

    @classmethod
    def parse(cls, value: "str | Parameterization") -> "Parameterization":
        return parse_enum(cls, value, "parameterization")


def target(parameterization: str | Parameterization, x0: torch.Tensor, eps: torch.Tensor,
           alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The regression target of the network for clean data `x0` noised with `eps` at (alpha, sigma).

    :param alpha: sqrt(alphas_cumprod[t]), broadcastable to `x0` (e.g. [N x 1 x 1 x 1]).
    :param sigma: sqrt(1 - alphas_cumprod[t]), same shape as `alpha`.
    """
    p = Parameterization.parse(parameterization)
    if p is Parameterization.EPS:
        return eps
    if p is Parameterization.X0:
        return x0
    return alpha * eps - sigma * x0


def to_x0_eps(parameterization: str | Parameterization, output: torch.Tensor, x_t: torch.Tensor,
              alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts a network output at x_t into the predicted clean sample and noise.

    :param output: an [N x C x ...] Tensor, the network output.
    :param x_t: the [N x C x ...] noisy input.
    :param alpha: sqrt(alphas_cumprod[t]), broadcastable to `x_t`.
    :param sigma: sqrt(1 - alphas_cumprod[t]), broadcastable to `x_t`.
    :return: (x0, eps), each shaped as `x_t`.
    """
    p = Parameterization.parse(parameterization)
    if p is Parameterization.EPS:
        return (x_t - sigma * output) / alpha, output
    if p is Parameterization.X0:
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output

