"""Small classes that the instantiation tests name as config targets."""
from __future__ import annotations

import torch


class Base(torch.nn.Module):
    """Required `width`, optional `depth`."""

    def __init__(self, width: int, depth: int = 1) -> None:
        super().__init__()
        self.width = width
        self.depth = depth


class Child(Base):
    """Adds `dropout` and forwards the rest to :class:`Base` through **kwargs."""

    def __init__(self, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dropout = dropout


def make_pair(first: int, second: int = 2) -> tuple[int, int]:
    return first, second
