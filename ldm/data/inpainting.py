"""Inpainting data: any image dataset plus LaMa-style masks.

Adds to each item ``mask`` float32 [H, W, 1] in {0, 1} (1 = hole, as in the LDM inpainting script) and
``masked_image = image * (1 - mask)`` (``image`` in [-1, 1], so holes read 0).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset

from ldm.data.base import item_rng
from ldm.data.masks import MaskGenerator
from ldm.util import instantiate_from_config


class InpaintingDataset(Dataset):
    """Wraps a dataset whose items have ``image`` float32 [H, W, 3] in [-1, 1].

    :param dataset: the dataset, or its config (``{target: ..., params: ...}``).
    :param mask_kind: thin, medium, thick, box or mixed (see :mod:`ldm.data.masks`).
    :param max_coverage: largest hole fraction (LaMa: 0.5).
    :param seed: None: fresh masks every time (training); an int: a fixed mask per index (evaluation).
    """

    def __init__(self, dataset: Dataset | Mapping[str, Any], mask_kind: str = "mixed", max_coverage: float = 0.5,
                 seed: int | None = None) -> None:
        super().__init__()
        self.dataset = instantiate_from_config(dataset) if isinstance(dataset, Mapping) else dataset
        self.masks = MaskGenerator(mask_kind, max_coverage=max_coverage)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        return getattr(self.dataset, "skipped", 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        image = example["image"]
        mask = self.masks(image.shape[0], image.shape[1], item_rng(self.seed, index))[..., None]
        example["mask"] = mask
        example["masked_image"] = (image * (1.0 - mask)).astype(np.float32)
        return example
