"""Images read by the sampling scripts: every mode becomes RGB in [-1, 1] by the datasets' rule; bad files are named.
Grids with a label per row hold every image, zoomed, where its row and column say."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference import labelled_grid, load_image


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


def test_labelled_grid_puts_each_image_zoomed_in_its_row_and_column():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 3, 5, 3), dtype=np.uint8)  # 3 labels x 2 per row, non-square 3x5
    grid = np.asarray(labelled_grid(images, ["a", "longer label", "c"], per_row=2, zoom=3))
    h, w, pad = 3 * 3, 5 * 3, 2
    text_w = grid.shape[1] - 2 * (w + pad)
    assert grid.shape[0] == 3 * (h + pad) and text_w > 12
    for r in range(3):
        for c in range(2):
            y, x = r * (h + pad), text_w + c * (w + pad)
            expected = images[2 * r + c].repeat(3, axis=0).repeat(3, axis=1)  # nearest-neighbour zoom
            assert np.array_equal(grid[y:y + h, x:x + w], expected), (r, c)
    assert (grid[:, :text_w] < 128).any()  # the labels are drawn
    with pytest.raises(ValueError, match="5 images for 3 labels of 2"):
        labelled_grid(images[:5], ["a", "b", "c"], per_row=2)
