"""The DDPM training loss as a small callable: simple loss, learned log-variance weighting and the VLB term.

For a network output `out` and its regression target `y` (eps, x0 or v; see parameterization.py) at steps t,
with per-example weights w (a loss weighting, see training.py; 1 by default):

    l_simple = mean_flat(d(out, y))                        # [N], d = squared or absolute error
    loss = l_simple_weight * mean(w * l_simple / exp(logvar[t]) + logvar[t])
         + original_elbo_weight * mean(lvlb_weights[t] * l_simple)

as in the original LatentDiffusion (with logvar = 0 and w = 1 the first term is the plain mean of l_simple).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.util import mean_flat, parse_enum


class LossType(str, enum.Enum):
    L1 = "l1"
    L2 = "l2"

    @classmethod
    def parse(cls, value: "str | LossType") -> "LossType":
        return parse_enum(cls, value, "loss_type")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """The per-element error between `pred` and `target` (same shape), unreduced."""
    if loss_type is LossType.L1:
        return F.l1_loss(pred, target, reduction="none")
    return F.mse_loss(pred, target, reduction="none")


@dataclass(frozen=True)
class DiffusionLoss:
    """The weighted DDPM objective; see the module docstring for the formula.

    :param loss_type: l1 or l2.
    :param l_simple_weight: weight of the (log-variance weighted) simple loss.
    :param original_elbo_weight: weight of the variational-bound term.
    :param log_logvar: whether to report the weighted loss and the mean log-variance (learned logvar).
    """

    loss_type: LossType = LossType.L2
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    log_logvar: bool = False

    def __call__(self, model_output: torch.Tensor, target: torch.Tensor, t: torch.Tensor, logvar: torch.Tensor,
                 lvlb_weights: torch.Tensor, prefix: str,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:param model_output: an [N x C x ...] network output; :param target: its target, same shape.
        :param t: an [N] long Tensor of timesteps; :param logvar: a [T] Tensor of log-variances.
        :param lvlb_weights: the [T] VLB weights; :param prefix: 'train' or 'val', prefixes the log keys.
        :param weights: [N] weights of each example's simple loss (None: all 1).
        :return: (scalar loss, dict of scalar Tensors to log)."""
        per_example = mean_flat(elementwise_loss(model_output.float(), target.float(), self.loss_type))
        logs = {f"{prefix}/loss_simple": per_example.mean()}
        logvar_t = logvar.to(per_example.device)[t]
        simple = per_example if weights is None else weights.to(per_example) * per_example
        weighted = simple / torch.exp(logvar_t) + logvar_t
        if self.log_logvar:
            logs[f"{prefix}/loss_gamma"] = weighted.mean()
            logs["logvar"] = logvar.detach().mean()
        loss = self.l_simple_weight * weighted.mean()
        loss_vlb = (lvlb_weights.to(per_example.device)[t] * per_example).mean()
        logs[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        logs[f"{prefix}/loss"] = loss
        return loss, logs
