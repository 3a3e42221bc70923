"""Evaluation of generative and first-stage models: FID, KID, Inception Score, precision/recall, PSNR/SSIM/LPIPS.

Typical use::

    from ldm.evaluation import compute_fid
    fid = compute_fid(samples_uint8_nhwc, reference_uint8_nhwc)   # a float; fid.extractor names the network
    print(fid.describe())
"""
from ldm.evaluation.features import FeatureStats, extract_features, reference_stats
from ldm.evaluation.fid import Score, compute_fid, fid_from_stats, frechet_distance, frechet_distance_from_features
from ldm.evaluation.images import ImageSource, open_images, to_uint8_nhwc
from ldm.evaluation.inception import (BUNDLED_NAME, STANDARD_NAME, BundledInception, ExtractorKind, FeatureExtractor,
                                      InceptionOutput, StandardInception, load_extractor)
from ldm.evaluation.inception_score import inception_score
from ldm.evaluation.kid import kid
from ldm.evaluation.prdc import precision_recall
from ldm.evaluation.reconstruction import psnr, ssim

__all__ = [
    "BUNDLED_NAME", "STANDARD_NAME", "BundledInception", "ExtractorKind", "FeatureExtractor", "FeatureStats",
    "ImageSource", "InceptionOutput", "Score", "StandardInception", "compute_fid", "extract_features",
    "fid_from_stats", "frechet_distance", "frechet_distance_from_features", "load_extractor", "open_images",
    "reference_stats", "to_uint8_nhwc", "inception_score", "kid", "precision_recall", "psnr", "ssim",
]
