"""Where the tests find the steering repo's shared material: `shared/` beside the repository (as in CI), or the
directory named by $LDM_SHARED_DIR."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LDM_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_CONFIGS = SHARED / "reference-configs"
