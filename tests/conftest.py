"""Shared pytest set-up: the repository root is importable (configs name `main.*` and `tests.helpers.*`)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> Path:
    """The repository's root directory (where main.py lives)."""
    return REPO_ROOT


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module (tiny models run faster on one thread than on two contended ones);
    use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
