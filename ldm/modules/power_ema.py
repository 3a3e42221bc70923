"""Power-function EMA profiles and their least-squares combination (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models", Sec. 3 and App. C).

A power-function EMA with exponent gamma > 0, updated after every optimiser step n = 1, 2, ... with
``beta_n = (1 - 1/n) ** (gamma + 1)``, holds after t updates the average

    theta_hat(t) = sum_k [(k/t) ** (gamma + 1) - ((k-1)/t) ** (gamma + 1)] theta_k,

which is exactly the integral ``int_0^t p(s) theta(s) ds`` of the continuous response
``p_{t,gamma}(s) = (gamma + 1) s**gamma / t**(gamma + 1)`` on [0, t] against the piecewise-constant trajectory
``theta(s) = theta_k`` for s in (k-1, k]. Its length is stated as the relative standard deviation of the response,
``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))`` (eq. 123), which does not depend on t; the profiles
with gamma > 0 cover ``0 < sigma_rel < 1/sqrt(12) ~ 0.2887``.

Post-hoc EMA: snapshots of a few profiles taken during training are themselves such averages, so an EMA of any
other length at the time of one of the snapshots is approximated by the combination ``sum_i x_i theta_hat_i``
whose response ``sum_i x_i p_i`` is closest in L2 to the wanted response ``p_r``. The inner product of two responses
has a closed form (App. C.3): for t_a <= t_b

    <p_{t_a,g_a}, p_{t_b,g_b}> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) t_b) * (t_a / t_b) ** g_b,

so the normal equations ``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>`` are solved directly; the
coefficients are then normalised to sum to 1 (a constant trajectory is reproduced exactly). The relative L2
residual ``|sum x_i p_i - p_r| / |p_r|`` measures how well the wanted length can be reconstructed from the
snapshots at hand; :func:`solve_coefficients` reports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ldm.checkpoint import save_safetensors
from ldm.modules.ema import LitEma, PowerFunctionProfile

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)  # the limit of sigma_rel as gamma -> 0
SNAPSHOT_FORMAT = "ldm-posthoc-ema"
SNAPSHOT_VERSION = "1"


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent `gamma` (eq. 123)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the profile with relative standard deviation `sigma_rel` (eq. 126): the largest
    real root of ``gamma**3 + 7 gamma**2 + (16 - s**-2) gamma + (12 - s**-2) = 0``.

    :raises ValueError: naming `sigma_rel` when it is outside (0, 1/sqrt(12)).
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"EMA length sigma_rel={sigma_rel} is outside (0, {MAX_SIGMA_REL:.4f}), the range of "
                         f"power-function profiles")
    q = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - q, 12.0 - q])
    return float(roots[np.abs(roots.imag) < 1e-9 * np.abs(roots).max()].real.max())


def response_inner_product(t_a: np.ndarray | float, gamma_a: np.ndarray | float, t_b: np.ndarray | float,
                           gamma_b: np.ndarray | float) -> np.ndarray:
    """``<p_{t_a,gamma_a}, p_{t_b,gamma_b}>`` in L2([0, inf)) (see the module docstring); broadcasts, float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    t_max = np.where(a_first, t_b, t_a)
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    exponent = np.where(a_first, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_max) * ratio ** exponent


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], t_out: float,
                       gamma_out: float) -> tuple[np.ndarray, float]:
    """The least-squares combination of snapshot profiles that best matches the profile (t_out, gamma_out).

    :param times: the update count t_i of each of K snapshots.
    :param gammas: the exponent gamma_i of each snapshot's profile.
    :param t_out: the time of the wanted profile (every snapshot used must have t_i <= t_out).
    :param gamma_out: the exponent of the wanted profile.
    :return: (the [K] float64 coefficients, summing to 1; the relative L2 residual of the combined response).
    """
    t = np.asarray(times, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    gram = response_inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = response_inner_product(t, g, t_out, gamma_out)
    coeffs = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    coeffs = coeffs / coeffs.sum()
    target_norm2 = float(response_inner_product(t_out, gamma_out, t_out, gamma_out))
    residual2 = target_norm2 - 2.0 * coeffs @ rhs + coeffs @ gram @ coeffs
    return coeffs, math.sqrt(max(residual2, 0.0) / target_norm2)


@dataclass(frozen=True)
class PosthocEMAConfig:
    """The ``posthoc_ema`` config section: the profile lengths kept during training and how often (in optimiser
    steps) rank zero writes their snapshots to ``<run>/posthoc_ema/``."""

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every: int = 500

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError(f"posthoc_ema.snapshot_every must be a positive number of steps, got "
                             f"{self.snapshot_every}")
        for s in self.sigma_rels:
            if not 0.0 < s < MAX_SIGMA_REL:
                raise ValueError(f"posthoc_ema.sigma_rels: {s} is outside (0, {MAX_SIGMA_REL:.4f}), the range of "
                                 f"power-function profiles")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], key: str = "posthoc_ema") -> "PosthocEMAConfig":
        """:raises ValueError: naming an unknown key or a bad value."""
        config = dict(config)
        unknown = sorted(set(config) - {"sigma_rels", "snapshot_every"})
        if unknown:
            raise ValueError(f"unknown {key} key(s) {', '.join(unknown)}; allowed: sigma_rels, snapshot_every")
        if "sigma_rels" in config:
            config["sigma_rels"] = tuple(float(s) for s in config["sigma_rels"])
        return cls(**config)


class PowerFunctionEMA(nn.Module):
    """Several power-function EMA profiles of a module's trainable parameters, tracked together.

    Each profile is a :class:`LitEma` with a :class:`PowerFunctionProfile` schedule (buffers ``profiles.<i>.*``);
    the lengths are kept as module extra state and checked when a checkpoint is loaded.

    :param model: the module whose parameters with ``requires_grad`` are tracked (as for :class:`LitEma`).
    :param sigma_rels: the profile lengths; EDM2 keeps 0.05 and 0.10.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        super().__init__()
        if not sigma_rels:
            raise ValueError("post-hoc EMA needs at least one profile length in sigma_rels")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.profiles = nn.ModuleList(LitEma(model, decay=1.0, schedule=PowerFunctionProfile(g))
                                      for g in self.gammas)

    @property
    def num_updates(self) -> int:
        """The number of updates t so far (the time of the profiles' responses)."""
        return int(self.profiles[0].num_updates)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One update of every profile towards the current parameters of `model`."""
        for profile in self.profiles:
            profile(model)

    def profile_weights(self, index: int) -> dict[str, torch.Tensor]:
        """The averaged weights of profile `index`, keyed by parameter name (with dots, as in `model`)."""
        profile = self.profiles[index]
        shadows = dict(profile.named_buffers())
        return {name: shadows[s_name] for name, s_name in profile.m_name2s_name.items()}

    def save_snapshots(self, directory: str | Path, step: int) -> list[Path]:
        """Writes each profile's weights to ``<directory>/phema-<step>-<sigma_rel>.safetensors``.

        The metadata records the format, the update count t, sigma_rel and gamma; `step` (e.g. the global step)
        only names the files. Call it on one process (rank zero).

        :return: the paths written.
        :raises ValueError: before the first update (there is no average yet).
        """
        t = self.num_updates
        if t < 1:
            raise ValueError("post-hoc EMA snapshot requested before the first update")
        paths = []
        for index, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            path = Path(directory) / f"phema-{step:09d}-{sigma_rel:.4f}.safetensors"
            metadata = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "t": str(t), "step": str(step),
                        "sigma_rel": repr(sigma_rel), "gamma": repr(gamma)}
            save_safetensors(self.profile_weights(index), path, metadata=metadata)
            paths.append(path)
        return paths

    def get_extra_state(self) -> dict[str, Any]:
        return {"sigma_rels": list(self.sigma_rels)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = tuple(float(s) for s in state["sigma_rels"])
        if saved != self.sigma_rels:
            raise ValueError(f"the checkpoint's post-hoc EMA profiles have sigma_rels {list(saved)} but the config "
                             f"asks for {list(self.sigma_rels)}")
