"""Conditional accuracy: the classifier learns real classes, and the share counts agreement with the intent."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.evaluation.classifier import conditional_accuracy, predict, train_classifier


def _coloured_squares(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes: a red, green or blue square at a random place on a grey background, with noise."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((3 * n_per_class, 3, 16, 16), -0.2)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    for i, label in enumerate(labels.tolist()):
        y, x = torch.randint(0, 9, (2,), generator=gen).tolist()
        images[i, :, y:y + 7, x:x + 7] = -1.0
        images[i, label, y:y + 7, x:x + 7] = 1.0
    return images + 0.1 * torch.randn(images.shape, generator=gen), labels


def test_classifier_learns_held_out_classes():
    train_x, train_y = _coloured_squares(32, seed=0)
    test_x, test_y = _coloured_squares(16, seed=1)
    classifier = train_classifier(train_x, train_y, n_classes=3, steps=60, batch_size=32, seed=0,
                                  disable_progress=True)
    assert conditional_accuracy(classifier, test_x, test_y) >= 0.95
    # the same images with the wrong intended labels score (almost) nothing
    assert conditional_accuracy(classifier, test_x, (test_y + 1) % 3) <= 0.05


def test_conditional_accuracy_is_the_share_of_agreement():
    class FirstPixelRed(nn.Module):
        """Predicts class 1 where the red channel of the first pixel is positive, else class 0."""

        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            red = (x[:, 0, 0, 0] > 0).long()
            return torch.nn.functional.one_hot(red, 2).float() + self.dummy

    images = -torch.ones(5, 3, 4, 4)
    images[[1, 3], 0, 0, 0] = 1.0
    assert predict(FirstPixelRed(), images, batch_size=2).tolist() == [0, 1, 0, 1, 0]
    assert conditional_accuracy(FirstPixelRed(), images, torch.tensor([0, 1, 1, 1, 1])) == pytest.approx(3 / 5)


def test_training_checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        train_classifier(torch.zeros(4, 3, 16, 16), torch.zeros(3, dtype=torch.long), n_classes=2, steps=1)
