"""notebooks/latent_imagenet_diffusion.ipynb runs on a tiny class-conditional checkpoint and writes its grid."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

from tests.test_scripts_sampling import make_model

REPO = Path(__file__).resolve().parent.parent


def test_notebook_samples_a_class_grid(tmp_path, monkeypatch):
    config, ckpt = make_model("class", tmp_path)
    out = tmp_path / "nb-out"
    for k, v in {"LDM_CONFIG": config, "LDM_CKPT": ckpt, "LDM_OUTDIR": out, "LDM_CLASSES": "2,5,9",
                 "LDM_N_SAMPLES": 2, "LDM_STEPS": 3, "LDM_SCALE": 2.5, "OMP_NUM_THREADS": 1,
                 "CUDA_VISIBLE_DEVICES": ""}.items():
        monkeypatch.setenv(k, str(v))
    nb = nbformat.read(REPO / "notebooks" / "latent_imagenet_diffusion.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    with Image.open(out / "grid.png") as grid:
        # 3 classes (rows) x 2 samples (columns) of 32 x 32 images with 2-pixel padding
        assert grid.size == (2 * 34 + 2, 3 * 34 + 2) and grid.mode == "RGB"
    printed = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "null class 10" in printed and "class '9'" in printed
