"""Shared pytest set-up: the repository root is importable (configs name `main.*` and `tests.helpers.*`), and the
shared reference configs are required in CI: without them a CI run stops at once instead of skipping their tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.helpers.paths import REFERENCE_CONFIGS  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and not REFERENCE_CONFIGS.is_dir():
        raise pytest.UsageError(f"the reference configs are missing: {REFERENCE_CONFIGS} does not exist. CI needs "
                                f"the shared directory beside the repository, or LDM_SHARED_DIR pointing at it")


def pytest_report_header(config: pytest.Config) -> str:
    state = "found" if REFERENCE_CONFIGS.is_dir() else "MISSING: their tests are skipped (set LDM_SHARED_DIR)"
    return f"reference configs: {REFERENCE_CONFIGS} ({state})"


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
