"""The standard FID Inception wrapper (random weights: the real file cannot be downloaded here), extractor choice,
and the sample-metrics suite with an extractor that has logits."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from ldm.evaluation import FeatureExtractor, InceptionOutput
from ldm.evaluation.evaluate import Metric, evaluate_samples
from ldm.evaluation.features import FeatureStats, reference_stats
from ldm.evaluation.inception import (STANDARD_NAME, STANDARD_WEIGHTS_NAME, BundledInception, StandardInception,
                                      _FIDInceptionA, _tf_bilinear_resize, build_fid_inception, load_extractor)


@pytest.fixture(scope="module")
def fid_net():
    torch.manual_seed(0)
    net = build_fid_inception()
    for m in net.modules():  # init_weights=False leaves BN statistics at 0/1; give the convs a sane scale
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return net


def test_fid_inception_has_the_pytorch_fid_state_dict_layout(fid_net):
    sd = fid_net.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in sd)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    # Same parameter names and shapes as torchvision's net: only the pooling inside the blocks differs.
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in tv.state_dict().items()}


def test_tf_style_pool_ignores_padding():
    block = _FIDInceptionA(4, pool_features=2).eval()
    x = torch.randn(1, 4, 5, 5)
    ours = block._forward(x)[3]
    tv_pool = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))  # torchvision counts the zero padding
    assert torch.allclose(ours[..., 2, 2], tv_pool[..., 2, 2], atol=1e-6)  # interior: identical
    assert not torch.allclose(ours[..., 0, 0], tv_pool[..., 0, 0], atol=1e-4)  # corners: padding excluded


def test_standard_extractor_loads_weights_file_and_gives_features_and_logits(tmp_path, fid_net, monkeypatch):
    path = tmp_path / STANDARD_WEIGHTS_NAME
    torch.save(fid_net.state_dict(), path)
    ex = load_extractor("standard", weights=path, device="cpu")
    assert isinstance(ex, StandardInception) and ex.name == STANDARD_NAME and ex.provides_logits
    imgs = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = ex(imgs)
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, 1008)
    # The logits are the fc layer on the pool features (as in the TF graph's softmax head).
    assert torch.allclose(out.logits, fid_net.fc(out.features), atol=1e-4)
    # Found in the torch hub cache without an explicit path.
    (tmp_path / "checkpoints").mkdir()
    path.rename(tmp_path / "checkpoints" / STANDARD_WEIGHTS_NAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert isinstance(load_extractor("auto", device="cpu"), StandardInception)


def test_missing_standard_weights_error_or_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=STANDARD_WEIGHTS_NAME):
        load_extractor("standard", device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_extractor("standard", weights=tmp_path / "nope.pth", device="cpu")
    with caplog.at_level(logging.WARNING):
        ex = load_extractor("auto", device="cpu")
    assert isinstance(ex, BundledInception)
    assert "not comparable" in caplog.text and STANDARD_WEIGHTS_NAME in caplog.text


def test_tf_bilinear_resize_keeps_constants_and_matches_align_corners_false_on_upsampling_centres():
    x = torch.full((1, 3, 8, 8), 0.25)
    assert torch.allclose(_tf_bilinear_resize(x, 299), torch.full((1, 3, 299, 299), 0.25))
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    out = _tf_bilinear_resize(ramp, 16)
    # TF's legacy resize samples source x = i * in/out (no half-pixel offset): output column 2*j is input column j.
    assert torch.allclose(out[0, 0, 0, ::2], torch.arange(8.0), atol=1e-5)


class LogitExtractor(FeatureExtractor):
    """Fake: features = mean colour + std; logits = one-hot of the dominant channel (3 classes)."""

    name = "logit-fake (test)"
    provides_logits = True

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = images.float() / 255.0
        means = x.mean(dim=(2, 3))
        return InceptionOutput(features=torch.cat([means, x.std(dim=(2, 3))], 1),
                               logits=60.0 * F.one_hot(means.argmax(1), 3).float())


def _coloured(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, size=(n, 8, 8, 3)).astype(np.uint8)
    for i in range(n):
        imgs[i, ..., i % 3] += 150  # evenly spread dominant colours -> 3 confident classes
    return imgs


def test_evaluate_samples_all_metrics_and_stats_only_reference(tmp_path):
    ex = LogitExtractor()
    samples, ref = _coloured(36, 0), _coloured(36, 1)
    res = evaluate_samples(samples, ref, ex, Metric.parse("fid,kid,is,pr"), batch_size=7, kid_subsets=5,
                           kid_subset_size=20, is_splits=3, progress=False)
    assert res["extractor"] == ex.name and res["n_samples"] == 36 and res["n_reference"] == 36
    assert res["is_mean"] == pytest.approx(3.0, rel=1e-6)
    assert 0 <= res["fid"] < 0.05 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    stats_path = tmp_path / "mu_sigma_only.npz"
    full = reference_stats(ref, ex)
    np.savez(stats_path, mu=full.mu, sigma=full.sigma)
    res2 = evaluate_samples(samples, str(stats_path), ex, [Metric.FID, Metric.KID, Metric.PR], progress=False)
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-6)
    assert res2["kid_mean"] is None and "features" in res2["kid_unavailable"]
    assert res2["precision"] is None and "features" in res2["pr_unavailable"]
    assert FeatureStats.load(stats_path).extractor.startswith("unknown")
