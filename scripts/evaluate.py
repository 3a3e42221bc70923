#!/usr/bin/env python
"""Evaluate samples (FID, KID, Inception Score, precision/recall) or a first-stage model (PSNR, SSIM, LPIPS, rFID).

Samples against a reference (folders, image .npz files, or cached statistics .npz)::

    python scripts/evaluate.py --samples outputs/samples.npz --reference data/ref_folder --metrics fid,kid,is,pr \
        --json results.json

Reconstructions of a first-stage model over a dataset::

    python scripts/evaluate.py --first-stage-config configs/autoencoder/kl-f8.yaml --first-stage-ckpt model.ckpt \
        --data-config configs/data/imagenet-val.yaml --num-images 50000 --json recon.json

Every number is printed with the name of the Inception network it comes from; see scripts/EVALUATION.md for
the protocols of the paper's tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from ldm.evaluation.evaluate import (Metric, evaluate_first_stage, evaluate_samples, image_batches,
                                     load_eval_dataset, load_first_stage)
from ldm.evaluation.features import reference_stats
from ldm.evaluation.inception import ExtractorKind, default_device, load_extractor

LABELS = {"fid": "FID", "kid_mean": "KID (mean)", "kid_std": "KID (std)", "is_mean": "Inception Score (mean)",
          "is_std": "Inception Score (std)", "precision": "Precision", "recall": "Recall", "psnr": "PSNR (dB)",
          "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID"}
UNAVAILABLE_KEYS = {"kid_mean": "kid", "kid_std": "kid", "is_mean": "is", "is_std": "is", "precision": "pr",
                    "recall": "pr"}
EXTRACTOR_METRICS = {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "rfid"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldm" / "evaluation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("samples vs reference")
    g.add_argument("--samples", help="folder of images or .npz (arr_0: uint8 N x H x W x 3)")
    g.add_argument("--reference", help="folder of images, image .npz, or statistics .npz (mu, sigma[, features])")
    g.add_argument("--metrics", default="fid", help="comma-separated: fid,kid,is,pr (default: fid)")
    g.add_argument("--save-stats", help="write the reference statistics (with features) to this .npz")
    g.add_argument("--kid-subsets", type=int, default=100)
    g.add_argument("--kid-subset-size", type=int, default=1000)
    g.add_argument("--is-splits", type=int, default=10)
    g.add_argument("--pr-k", type=int, default=3, help="neighbourhood size of precision/recall (default 3)")
    g.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"),
                   help="resize folder images to H x W (needed when a folder mixes sizes)")
    r = p.add_argument_group("first-stage reconstructions")
    r.add_argument("--first-stage-config", help="YAML with the autoencoder (a `model:` section or the model itself)")
    r.add_argument("--first-stage-ckpt", help="checkpoint of the autoencoder (.ckpt/.safetensors)")
    r.add_argument("--data-config", help="YAML with the dataset (`data:` of a training config, or a dataset)")
    r.add_argument("--split", default="validation", help="split of the data config (default: validation)")
    r.add_argument("--num-images", type=int, help="evaluate at most this many images")
    r.add_argument("--no-lpips", action="store_true", help="skip LPIPS (it needs the VGG16 ImageNet weights)")
    r.add_argument("--lpips-random-backbone", action="store_true", help="LPIPS with a random VGG (tests only)")
    r.add_argument("--no-rfid", action="store_true", help="skip rFID")
    c = p.add_argument_group("common")
    c.add_argument("--extractor", default="auto", choices=[k.value for k in ExtractorKind],
                   help="Inception network: auto (standard if its weights are found, else bundled)")
    c.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth")
    c.add_argument("--batch-size", type=int, default=50)
    c.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: the accelerator if any)")
    c.add_argument("--cache-dir", default=str(default_cache_dir()), help="reference statistics cache")
    c.add_argument("--no-cache", action="store_true", help="do not read or write cached reference statistics")
    c.add_argument("--json", help="write the results to this JSON file")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    recon = args.first_stage_config is not None
    if recon and args.data_config is None:
        p.error("--first-stage-config needs --data-config")
    if not recon and args.reference is None:
        p.error("give --reference (with --samples or --save-stats), or --first-stage-config for reconstructions")
    if not recon and args.samples is None and args.save_stats is None:
        p.error("give --samples to evaluate, or --save-stats to only compute reference statistics")
    return args


def report(results: dict) -> None:
    """Prints one line per number, each naming its extractor."""
    extractor = results.get("extractor")
    for key, label in LABELS.items():
        if key not in results:
            continue
        value = results[key]
        reason = results.get(f"{UNAVAILABLE_KEYS.get(key, key)}_unavailable", "not computed")
        text = f"unavailable ({reason})" if value is None else f"{value:.6g}"
        suffix = f"   [{extractor}]" if key in EXTRACTOR_METRICS and extractor else ""
        print(f"{label:>24}: {text}{suffix}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    progress = False if args.quiet else None
    cache_dir = None if args.no_cache else args.cache_dir
    recon = args.first_stage_config is not None
    extractor = None
    if not (recon and args.no_rfid):
        extractor = load_extractor(args.extractor, args.inception_weights, args.device)
        print(f"Inception network: {extractor.name}")
    if recon:
        model = load_first_stage(OmegaConf.to_container(OmegaConf.load(args.first_stage_config), resolve=True),
                                 args.first_stage_ckpt)
        model = model.to(extractor.device if extractor is not None else args.device or default_device())
        dataset = load_eval_dataset(OmegaConf.to_container(OmegaConf.load(args.data_config), resolve=True),
                                    args.split)
        results = evaluate_first_stage(model, image_batches(dataset, args.batch_size), extractor,
                                       use_lpips=not args.no_lpips, lpips_random_backbone=args.lpips_random_backbone,
                                       max_images=args.num_images, progress=progress)
        results.update(first_stage_config=args.first_stage_config, first_stage_ckpt=args.first_stage_ckpt,
                       data_config=args.data_config, split=args.split)
    elif args.samples is None:
        stats = reference_stats(args.reference, extractor, cache_dir=cache_dir, batch_size=args.batch_size,
                                progress=progress, size=args.resize)
        stats.save(args.save_stats)
        results = {"extractor": extractor.name, "reference": args.reference, "n_reference": stats.n,
                   "stats": args.save_stats}
        print(f"wrote statistics of {stats.n} images to {args.save_stats}")
    else:
        results = evaluate_samples(args.samples, args.reference, extractor, Metric.parse(args.metrics),
                                   batch_size=args.batch_size, cache_dir=cache_dir, kid_subsets=args.kid_subsets,
                                   kid_subset_size=args.kid_subset_size, is_splits=args.is_splits, pr_k=args.pr_k,
                                   size=args.resize, progress=progress)
        if args.save_stats:
            reference_stats(args.reference, extractor, cache_dir=cache_dir, batch_size=args.batch_size,
                            progress=progress, size=args.resize).save(args.save_stats)
        skipped = results.get("n_samples_skipped", 0)
        print(f"samples: {results['n_samples']} images ({skipped} unreadable skipped); "
              f"reference: {results.get('n_reference', 'n/a')} images")
    report(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
