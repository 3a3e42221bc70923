"""Images read by the sampling scripts: every mode becomes RGB in [-1, 1] by the datasets' rule; bad files are named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference import load_image


def test_transparent_pixels_become_white_and_grey_becomes_three_equal_channels(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (1, 3, 4, 6) and x.dtype == torch.float32
    assert torch.equal(x[0, :, :, :3], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 4, 3))
    assert torch.equal(x[0, :, :, 3:], torch.ones(3, 4, 3))  # white, not the black of a plain convert("RGB")

    Image.fromarray(np.full((5, 5), 51, dtype=np.uint8), "L").save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert torch.allclose(g, torch.full((1, 3, 5, 5), 51 / 127.5 - 1))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
