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
