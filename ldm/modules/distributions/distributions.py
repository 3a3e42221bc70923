"""Distributions over first-stage latents: the diagonal Gaussian posterior of the KL autoencoder."""
from __future__ import annotations

import math
from typing import Sequence

import torch


class AbstractDistribution:
    """What a first-stage posterior offers: a sample and a mode."""

    def sample(self) -> torch.Tensor:
        raise NotImplementedError

    def mode(self) -> torch.Tensor:
        raise NotImplementedError


class DiracDistribution(AbstractDistribution):
    """A point mass at `value`: sampling and the mode both return it."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class DiagonalGaussianDistribution(AbstractDistribution):
    """N(mean, diag(exp(logvar))) with mean and log-variance stacked along the channel axis.

    :param parameters: an [N x 2C x H x W] Tensor: the first C channels are the mean, the last C the
        log-variance (clamped to [-30, 20] as in the original).
    :param deterministic: if True the distribution is a point mass at the mean (zero variance, zero KL/NLL).
    """

    LOGVAR_MIN = -30.0
    LOGVAR_MAX = 20.0

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2:
            raise ValueError(f"expected an even number of channels (mean and log-variance stacked), "
                             f"got a tensor of shape {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, self.LOGVAR_MIN, self.LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample, an [N x C x H x W] Tensor (differentiable in mean and logvar)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean, an [N x C x H x W] Tensor."""
        return self.mean

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), summed over C, H, W: an [N] Tensor. `other` defaults to N(0, I)."""
        if self.deterministic:
            return self._zeros()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` (same shape as the mean), summed over `dims`."""
        if self.deterministic:
            return self._zeros()
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


def normal_kl(mean1: torch.Tensor | float, logvar1: torch.Tensor | float,
              mean2: torch.Tensor | float, logvar2: torch.Tensor | float) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); arguments broadcast, one must be a Tensor."""
    tensor = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl: at least one argument must be a Tensor")
    logvar1, logvar2 = (x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))
