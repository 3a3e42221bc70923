"""Every module of the `ldm` package imports on its own in a fresh interpreter: no import cycles, no module that
only works when another was imported first (e.g. a config naming ldm.models.diffusion.latent_diffusion)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# One interpreter (torch is imported once); before each module every `ldm` module is dropped from sys.modules,
# so each import starts from a clean `ldm` namespace, as in a fresh interpreter.
SCRIPT = r"""
import importlib, json, pkgutil, sys, traceback
import ldm
names = sorted(m.name for m in pkgutil.walk_packages(ldm.__path__, "ldm."))
failures = {}
for name in names:
    for loaded in [m for m in sys.modules if m == "ldm" or m.startswith("ldm.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps({"names": names, "failures": failures}))
"""


def test_every_ldm_module_imports_first_in_a_clean_interpreter():
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
                for p in (REPO / "ldm").rglob("*.py")}
    assert set(result["names"]) == expected - {"ldm"}  # every file was tried
    assert result["failures"] == {}, "\n".join(f"{k}:\n{v}" for k, v in result["failures"].items())
