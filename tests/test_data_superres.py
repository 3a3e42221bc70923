"""Super-resolution pairs from a folder: the bsr_sr config's parameters, exact bicubic pairs, skips."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from ldm.data.superres import SuperresFolderDataset
from ldm.modules.image_degradation import bicubic_degradation
from ldm.util import instantiate_from_config
from tests.test_data_base import natural, write_image
from tests.helpers.paths import REFERENCE_CONFIGS

REF = REFERENCE_CONFIGS / "latent-diffusion"


def test_bicubic_pairs_are_exact_and_small_images_are_skipped(tmp_path):
    for i, name in enumerate(("astronaut", "chelsea", "coffee")):
        write_image(tmp_path / f"{i}.png", "rgb", natural(name, side=48))
    write_image(tmp_path / "3_small.png", "rgb", natural(side=20))
    ds = SuperresFolderDataset(str(tmp_path), size=32, degradation="bicubic", seed=0)
    items = [ds[i] for i in range(4)]
    assert ds.skipped == 1 and items[3]["file_path_"].endswith("0.png")  # the small one wraps to the first
    for it in items:
        assert it["image"].shape == (32, 32, 3) and it["LR_image"].shape == (8, 8, 3)
        hr = np.round((it["image"] + 1) * 127.5).astype(np.uint8)
        assert np.array_equal(np.round((it["LR_image"] + 1) * 127.5).astype(np.uint8), bicubic_degradation(hr, 4))
    assert np.array_equal(ds[1]["LR_image"], items[1]["LR_image"])  # seeded: fixed pairs


def test_the_bsr_sr_config_parameters_work_with_a_folder(tmp_path):
    write_image(tmp_path / "a.png", "rgb", natural("astronaut"))
    cfg = OmegaConf.load(REF / "models/ldm/bsr_sr/config.yaml").data.params.train
    cfg.target = "ldm.data.superres.SuperresFolderDataset"
    cfg.params.root = str(tmp_path)
    ds = instantiate_from_config(cfg)
    item = ds[0]
    assert item["image"].shape == (256, 256, 3) and item["LR_image"].shape == (64, 64, 3)
    assert ds.degradation.value == "bsrgan_light"
    with pytest.raises(FileNotFoundError, match="high-resolution"):
        SuperresFolderDataset(str(tmp_path / "missing"))
