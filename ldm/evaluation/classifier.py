"""Conditional accuracy: the share of samples that an independent classifier assigns to the prompted class.

The classifier is a small CNN trained on real images only, so it knows nothing of the generator.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class SmallClassifier(nn.Module):
    """A compact CNN for [N x 3 x H x W] images in [-1, 1] (H, W >= 16): three conv stages, global pooling."""

    def __init__(self, n_classes: int, width: int = 32):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.SiLU(),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:return: [N x n_classes] logits."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     disable_progress: bool | None = None) -> SmallClassifier:
    """Trains a :class:`SmallClassifier` on real images.

    :param images: an [N x 3 x H x W] float Tensor in [-1, 1] (already augmented as wanted).
    :param labels: an [N] long Tensor of class indices in [0, n_classes).
    :return: the trained classifier, in eval mode, on the device of `images`.
    """
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"expected [N x 3 x H x W] images and [N] labels, got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(n_classes).to(images.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="training the evaluation classifier", disable=disable_progress):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen).to(images.device)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class predictions ([N] long) for [N x 3 x H x W] images in [-1, 1]."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(images[i:i + batch_size].to(device)).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch_size)])


def conditional_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of `images` that `classifier` assigns to their intended class `labels` ([N] long)."""
    return (predict(classifier, images) == labels.cpu()).float().mean().item()
