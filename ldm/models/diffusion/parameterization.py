"""What the network predicts (eps, x0 or v) and the conversions between the three, for the loss and samplers.

With x_t = alpha_t * x0 + sigma_t * eps (alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t)):
eps-prediction outputs eps, x0-prediction outputs x0, v-prediction outputs v = alpha_t * eps - sigma_t * x0.
A :class:`Prediction` is the pair (x0, eps) that a network output implies; samplers and guiders work on it.
"""
from __future__ import annotations

import dataclasses
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


def target(parameterization: Parameterization | str, x0: torch.Tensor, eps: torch.Tensor,
           alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The regression target of the network for clean data `x0` noised with `eps` at (alpha, sigma).

    :param parameterization: a :class:`Parameterization` (its string value compares equal).

    :param alpha: sqrt(alphas_cumprod[t]), broadcastable to `x0` (e.g. [N x 1 x 1 x 1]).
    :param sigma: sqrt(1 - alphas_cumprod[t]), same shape as `alpha`.
    """
    if parameterization == Parameterization.EPS:
        return eps
    if parameterization == Parameterization.X0:
        return x0
    return alpha * eps - sigma * x0


def to_x0_eps(parameterization: Parameterization | str, output: torch.Tensor, x_t: torch.Tensor,
              alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts a network output at x_t into the predicted clean sample and noise.

    :param output: an [N x C x ...] Tensor, the network output.
    :param x_t: the [N x C x ...] noisy input.
    :param alpha: sqrt(alphas_cumprod[t]), broadcastable to `x_t`.
    :param sigma: sqrt(1 - alphas_cumprod[t]), broadcastable to `x_t`.
    :return: (x0, eps), each shaped as `x_t`.
    """
    if parameterization == Parameterization.EPS:
        return (x_t - sigma * output) / alpha, output
    if parameterization == Parameterization.X0:
        return output, (x_t - alpha * output) / sigma
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output


@dataclasses.dataclass(frozen=True)
class NoisyInput:
    """A batch at some noise level: x_t = alpha * x0 + sigma * eps, fed to the network at timesteps `t`.

    :param x: [N x C x ...] the noisy sample x_t.
    :param t: [N] the network's timesteps (long, or float for the sigma-space samplers).
    :param alpha: sqrt(a_t) as [N x 1 x ...]; :param sigma: sqrt(1 - a_t), same shape.
    """

    x: torch.Tensor
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

    def repeat(self, n: int) -> "NoisyInput":
        """The batch stacked `n` times along the batch axis (for one batched forward of several branches)."""
        return NoisyInput(*(torch.cat([v] * n) for v in (self.x, self.t, self.alpha, self.sigma)))


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The clean sample and the noise a denoiser predicts for a :class:`NoisyInput`, each [N x C x ...].

    Predictions combine linearly field by field (``u + s * (c - u)``), which equals combining the network
    outputs, since x0 and eps are affine in the output at fixed x_t.
    """

    x0: torch.Tensor
    eps: torch.Tensor

    @classmethod
    def from_output(cls, parameterization: Parameterization, output: torch.Tensor,
                    inp: NoisyInput) -> "Prediction":
        return cls(*to_x0_eps(parameterization, output, inp.x, inp.alpha, inp.sigma))

    @classmethod
    def from_eps(cls, eps: torch.Tensor, inp: NoisyInput) -> "Prediction":
        """The prediction with noise `eps` (x0 follows from x_t): what a score correction returns."""
        return cls((inp.x - inp.sigma * eps) / inp.alpha, eps)

    @classmethod
    def from_x0(cls, x0: torch.Tensor, inp: NoisyInput) -> "Prediction":
        """The prediction with clean sample `x0` (eps follows from x_t)."""
        return cls(x0, (inp.x - inp.alpha * x0) / inp.sigma)

    def chunk(self, n: int) -> tuple["Prediction", ...]:
        return tuple(Prediction(x0, eps) for x0, eps in zip(self.x0.chunk(n), self.eps.chunk(n)))

    def __add__(self, other: "Prediction") -> "Prediction":
        return Prediction(self.x0 + other.x0, self.eps + other.eps)

    def __sub__(self, other: "Prediction") -> "Prediction":
        return Prediction(self.x0 - other.x0, self.eps - other.eps)

    def __rmul__(self, scale: float | torch.Tensor) -> "Prediction":
        return Prediction(scale * self.x0, scale * self.eps)
