"""Classifier guidance (ClassifierGuidance): the Dhariwal & Nichol correction, exact at scale 0, in every sampler,
composed with classifier-free guidance."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.guidance import CFGGuider, ClassifierGuidance
from ldm.models.diffusion.parameterization import NoisyInput, Prediction
from ldm.models.diffusion.sampling import SamplerKind, SamplingOptions, sample

from tests.test_sampling_models import GaussianModel, single_thread  # noqa: F401


class LinearClassifier(torch.nn.Module):
    """logits = x W (x flattened), independent of t: log p(y | x) has the analytic gradient W_y - sum_k p_k W_k."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


def test_the_correction_is_eps_minus_sigma_scale_gradient_and_x0_follows():
    torch.manual_seed(0)
    clf = LinearClassifier(torch.randn(6, 3))
    x = torch.randn(4, 6)
    alpha, sigma = torch.rand(4, 1) * 0.5 + 0.4, torch.rand(4, 1) * 0.5 + 0.3
    inp = NoisyInput(x, torch.tensor([10, 200, 500, 900]), alpha, sigma)
    pred = Prediction(torch.randn(4, 6), torch.randn(4, 6))
    y = torch.tensor([0, 2, 1, 2])
    term = ClassifierGuidance(clf, y, scale=3.0)
    guided = term(lambda _inp, _c: pred, inp, None)
    p = torch.softmax(x @ clf.weight, dim=1)
    grad = clf.weight.T[y] - p @ clf.weight.T
    torch.testing.assert_close(guided.eps, pred.eps - sigma * 3.0 * grad)
    torch.testing.assert_close(guided.x0, pred.x0 + sigma ** 2 / alpha * 3.0 * grad)
    # the pair stays consistent with x_t = alpha x0 + sigma eps wherever the unguided one was
    consistent = Prediction.from_eps(pred.eps, inp)
    again = term(lambda _inp, _c: consistent, inp, None)
    torch.testing.assert_close(alpha * again.x0 + sigma * again.eps, x)
    with pytest.raises(ValueError, match="2 labels for a batch of 4"):
        ClassifierGuidance(clf, y[:2], 1.0)(lambda _inp, _c: pred, inp, None)


def run(sampler: str, guider, seed: int = 1):
    model = GaussianModel("eps", mu=0.0, s=0.5)
    torch.manual_seed(0)
    x_T = torch.randn(128, 1)
    c = torch.full((128,), 0.2)
    options = SamplingOptions(sampler=sampler, steps=1000 if sampler == "ddpm" else 12)
    torch.manual_seed(seed)
    return sample(model, x_T.shape, c, guider=guider, options=options, x_T=x_T).samples


def two_class_classifier() -> LinearClassifier:
    """p(y = 1 | x) = sigmoid(2 x): class 1 is 'x positive'."""
    return LinearClassifier(torch.tensor([[-1.0, 1.0]]))


@pytest.mark.parametrize("sampler", [k.value for k in SamplerKind])
def test_scale_zero_is_the_unguided_sampler_bit_for_bit(sampler):
    uc = torch.zeros(128)
    plain = run(sampler, CFGGuider(2.0, uc))
    zero = run(sampler, ClassifierGuidance(two_class_classifier(), torch.ones(128), 0.0, inner=CFGGuider(2.0, uc)))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("sampler", [k.value for k in SamplerKind])
def test_a_positive_scale_raises_the_probability_of_the_target_class(sampler):
    """Composed with classifier-free guidance (which alone centres the samples at 0.4), guidance towards class 1
    raises the classifier's mean p(1 | x_0), and towards class 0 lowers it."""
    clf, uc = two_class_classifier(), torch.zeros(128)
    zero = torch.zeros(1, dtype=torch.long)

    def p1(x):
        return torch.softmax(clf(x, zero), dim=1)[:, 1].mean().item()

    cfg = run(sampler, CFGGuider(2.0, uc))
    up = run(sampler, ClassifierGuidance(clf, torch.ones(128), 1.0, inner=CFGGuider(2.0, uc)))
    down = run(sampler, ClassifierGuidance(clf, torch.zeros(128), 1.0, inner=CFGGuider(2.0, uc)))
    assert abs(cfg.mean().item() - 0.4) < 0.1
    assert p1(up) > p1(cfg) + 0.05 and p1(down) < p1(cfg) - 0.05, (p1(down), p1(cfg), p1(up))
    assert up.abs().max() < 3.0 and down.abs().max() < 3.0  # moved, not blown up
