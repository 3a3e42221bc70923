"""Guidance: how the denoiser turns network calls into one prediction (Ho & Salimans 2022 and friends).

A guider is called as ``guider(predict, inp, cond) -> Prediction`` where ``predict(inp, cond)`` is the
unguided model (a network call converted to (x0, eps), see parameterization.py), `inp` a :class:`NoisyInput`
and `cond` the conditioning. :class:`CFGGuider` runs the unconditional and conditional branches in one batched
forward and combines them exactly as the original: ``uc + scale * (c - uc)``. Further guidance terms (a
classifier's gradient, a score corrector) subclass :class:`GuidanceTerm`: they wrap an inner guider, usually
a CFGGuider, and correct its prediction, so they compose with classifier-free guidance in every sampler.
A guider whose correction needs gradients has ``requires_grad``; the sampling path then runs under
``torch.no_grad`` instead of ``torch.inference_mode``, and the term enables gradients where it needs them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import torch
import torch.nn.functional as F

from ldm.models.diffusion.parameterization import NoisyInput, Parameterization, Prediction

Conditioning = Any  # a Tensor, a list of Tensors, a dict {"c_concat": [...], "c_crossattn": [...]}, or None
PredictFn = Callable[[NoisyInput, Conditioning], Prediction]


class Guider(Protocol):
    """``(predict, inp, cond) -> Prediction``; see the module docstring."""

    requires_grad: bool

    def __call__(self, predict: PredictFn, inp: NoisyInput, cond: Conditioning) -> Prediction: ...


def concat_conditionings(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Stacks an unconditional and a conditional conditioning along the batch, matching their structure.

    Tensors are concatenated; lists item by item; dicts key by key. For dict (hybrid) conditionings, keys
    missing from `uncond` are shared with `cond` (e.g. ``c_concat``), and a non-dict `uncond` replaces
    ``c_crossattn`` (a negative prompt for a hybrid model).

    :return: a conditioning of the same structure with batch 2N: the unconditional half first.
    """
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping):
            uncond = {"c_crossattn": uncond}
        merged = {**cond, **uncond}
        unknown = set(merged) - set(cond)
        if unknown:
            raise ValueError(f"unconditional conditioning has keys {sorted(unknown)} that the conditioning "
                             f"lacks (it has {sorted(cond)})")
        return {k: concat_conditionings(merged[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        uncond = list(uncond) if isinstance(uncond, (list, tuple)) else [uncond]
        if len(uncond) != len(cond):
            raise ValueError(f"unconditional conditioning has {len(uncond)} items, the conditioning {len(cond)}")
        return [concat_conditionings(u, c) for u, c in zip(uncond, cond)]
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"unconditional conditioning must be a Tensor like the conditioning, "
                            f"got {type(uncond).__name__}")
        if uncond.shape[0] != cond.shape[0]:
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
        if uncond.shape != cond.shape:
            raise ValueError(f"unconditional conditioning of shape {tuple(uncond.shape)} does not match the "
                             f"conditioning's {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    raise TypeError(f"cannot batch conditionings of type {type(cond).__name__} for guidance")


class CFGGuider:
    """Classifier-free guidance: ``uc + scale * (c - uc)`` from one batched forward of the model.

    :param scale: the guidance scale; 1 (or no `uncond`) makes the guider a plain conditional call.
    :param uncond: the unconditional (or negative) conditioning, structured like the conditioning.
    """

    requires_grad = False

    def __init__(self, scale: float = 1.0, uncond: Conditioning = None) -> None:
        self.scale = float(scale)
        self.uncond = uncond

    @property
    def active(self) -> bool:
        return self.uncond is not None and self.scale != 1.0

    def __call__(self, predict: PredictFn, inp: NoisyInput, cond: Conditioning) -> Prediction:
        """The guided prediction for an [N x C x ...] noisy batch."""
        if not self.active:
            return predict(inp, cond)
        uncond, cond_ = predict(inp.repeat(2), concat_conditionings(self.uncond, cond)).chunk(2)
        return uncond + self.scale * (cond_ - uncond)

    def __repr__(self) -> str:
        return f"CFGGuider(scale={self.scale}, uncond={'set' if self.uncond is not None else None})"


class GuidanceTerm:
    """A guidance term added on top of an inner guider (classifier-free guidance by default).

    Subclasses implement :meth:`correct`; set ``uses_grad = True`` when it takes gradients (e.g. of a
    classifier's log-likelihood with respect to x_t, where ``eps <- eps - sigma * scale * grad``).
    """

    uses_grad = False

    def __init__(self, inner: Guider | None = None) -> None:
        self.inner = inner if inner is not None else CFGGuider()

    @property
    def requires_grad(self) -> bool:
        """Whether this term or any inner one takes gradients."""
        return self.uses_grad or self.inner.requires_grad

    def __call__(self, predict: PredictFn, inp: NoisyInput, cond: Conditioning) -> Prediction:
        return self.correct(self.inner(predict, inp, cond), inp, cond)

    def correct(self, pred: Prediction, inp: NoisyInput, cond: Conditioning) -> Prediction:
        """The corrected prediction (same shapes as `pred`)."""
        raise NotImplementedError


class ScoreCorrection(GuidanceTerm):
    """The original's ``score_corrector``: ``eps <- corrector.modify_score(model, eps, x_t, t, cond, **kwargs)``
    after classifier-free guidance (eps-prediction models only, as in the original).

    :param model: passed to ``modify_score`` as the original does (the diffusion model).
    """

    def __init__(self, corrector: Any, model: Any, inner: Guider | None = None,
                 kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__(inner)
        parameterization = Parameterization.parse(model.parameterization)
        if parameterization is not Parameterization.EPS:
            raise ValueError(f"score_corrector needs an eps-prediction model, this one predicts "
                             f"{parameterization.value}")
        self.corrector, self.model, self.kwargs = corrector, model, dict(kwargs or {})

    def correct(self, pred: Prediction, inp: NoisyInput, cond: Conditioning) -> Prediction:
        eps = self.corrector.modify_score(self.model, pred.eps, inp.x, inp.t, cond, **self.kwargs)
        return Prediction.from_eps(eps, inp)


def log_prob_gradient(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                      t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The classifier-guidance term: the gradient of log p(y | x_t, t) with respect to x_t, per example.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (as samplers run). The classifier must
    treat examples independently (no batch norm), so the gradient of the summed log-probabilities is each
    example's own gradient.

    :param classifier: ``(x [N x C x H x W], t [N]) -> logits [N x K]``.
    :param x: an [N x C x H x W] Tensor of noisy latents.
    :param t: an [N] Tensor of diffusion steps.
    :param y: an [N] long Tensor of target classes.
    :return: an [N x C x H x W] Tensor (dtype of `x`).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        logits = classifier(x_in, t.clone())
        log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        selected = log_probs.gather(1, y.to(logits.device).long().reshape(-1, 1))
        (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad.to(x.dtype)


class ClassifierGuidance(GuidanceTerm):
    """Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Alg. 1 and 2) on top of an inner
    guider (classifier-free guidance by default): the gradient g of a noisy classifier's log p(y | x_t, t) shifts
    the noise prediction, ``eps <- eps - sigma_t * scale * g``, and so the predicted clean sample,
    ``x0 <- x0 + sigma_t^2 / alpha_t * scale * g`` (both fields of the :class:`Prediction` move together).

    Every sampler takes its step from this one prediction: DDIM as in Alg. 2; the ancestral DDPM step's mean moves
    by ``beta_t / sqrt(1 - beta_t) * scale * g``, Alg. 1's ``Sigma * scale * g`` to first order; the sigma-space
    samplers see the shifted x0 (the classifier gets x_t = alpha * x_sigma and the continuous timestep). With
    ``scale == 0`` the prediction is the inner one exactly.

    :param classifier: ``(x_t [N x C x h x w], t [N]) -> logits [N x K]``, treating examples independently.
    :param labels: an [N] long Tensor of target classes, one per sample.
    :param scale: the guidance scale s (the paper's classifier scale).
    """

    uses_grad = True

    def __init__(self, classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
                 scale: float, inner: Guider | None = None) -> None:
        super().__init__(inner)
        self.classifier, self.labels, self.scale = classifier, labels.long().reshape(-1), float(scale)

    def correct(self, pred: Prediction, inp: NoisyInput, cond: Conditioning) -> Prediction:
        if self.labels.shape[0] != inp.x.shape[0]:
            raise ValueError(f"classifier guidance has {self.labels.shape[0]} labels for a batch of {inp.x.shape[0]}")
        step = self.scale * inp.sigma * log_prob_gradient(self.classifier, inp.x, inp.t, self.labels.to(inp.x.device))
        return Prediction(pred.x0 + inp.sigma / inp.alpha * step, pred.eps - step)

    def __repr__(self) -> str:
        return f"ClassifierGuidance(scale={self.scale}, inner={self.inner!r})"


class ConditioningAtStep:
    """Hands an inner guider ``transform(cond, t)`` instead of `cond` (e.g. the legacy noised conditioning of
    ``num_timesteps_cond > 1``)."""

    def __init__(self, transform: Callable[[Conditioning, torch.Tensor], Conditioning], inner: Guider) -> None:
        self.transform, self.inner = transform, inner

    @property
    def requires_grad(self) -> bool:
        return self.inner.requires_grad

    def __call__(self, predict: PredictFn, inp: NoisyInput, cond: Conditioning) -> Prediction:
        return self.inner(predict, inp, self.transform(cond, inp.t))


def make_guider(model: Any, scale: float = 1.0, uncond: Conditioning = None, score_corrector: Any = None,
                corrector_kwargs: dict | None = None) -> Guider:
    """Classifier-free guidance, followed by the original's score corrector when one is given."""
    guider = CFGGuider(scale, uncond)
    if score_corrector is None:
        return guider
    return ScoreCorrection(score_corrector, model, inner=guider, kwargs=corrector_kwargs)
