"""Encode a dataset once with a config's frozen first stage into a latent cache for stage-two training.

    python scripts/cache_latents.py --config configs/demo/ldm.yaml --out cache/demo --split train validation \\
        model.params.first_stage_config.params.ckpt_path=logs/<stage-one run>/checkpoints/last.ckpt
    python main.py --base cache/demo/config.yaml -t

Builds ``model.params.first_stage_config`` (with the weights a full-model ``--ckpt``, or the config's own
``model.params.ckpt_path``, holds under ``first_stage_model.*``) and each dataset ``data.params.<split>``, and
writes ``<out>/<split>/``: shards of the KL posterior's mean and log-variance (or the latents of a deterministic
first stage) with the dataset's other fields. ``<out>/config.yaml`` is the config (with the command line's
overrides) whose cached splits read the cache:

    data:
      params:
        train:
          target: ldm.data.latent_cache.LatentCacheDataset
          params: {path: cache/demo/train}

An interrupted run resumes where it stopped when run again with the same arguments. Random augmentations of a
dataset are frozen into its cache; ``--passes N`` stores N augmented copies of every example.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

from ldm.checkpoint import load_state_dict, load_weights
from ldm.data.latent_cache import first_stage_fingerprint
from ldm.data.latent_cache_writer import STORAGE_DTYPES, CachePlan, CacheWriter
from ldm.inference import get_device, load_config
from ldm.models.diffusion.first_stage import freeze
from ldm.util import config_source, instantiate_from_config

logger = logging.getLogger("cache_latents")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", required=True, help="stage-two config(s), merged left to right")
    p.add_argument("--out", required=True, help="cache directory (created; an unfinished cache there is resumed)")
    p.add_argument("--split", nargs="+", default=["train"], help="the data.params.<split>s to encode")
    p.add_argument("--ckpt", default=None, help="a full-model checkpoint whose first_stage_model.* weights to use")
    p.add_argument("--image-key", default=None, help="the dataset's image field (default: first_stage_key)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1024, help="examples per shard file")
    p.add_argument("--passes", type=int, default=1, help="encode the dataset this many times (augmentations)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of the dataset")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32", help="storage precision")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_known_args(argv)


def build_first_stage(config: OmegaConf, ckpt: str | None) -> torch.nn.Module:
    """The frozen first stage of a stage-two config, with the weights training would give it: those of a
    full-model checkpoint (`ckpt`, else ``model.params.ckpt_path``) override the first-stage config's own."""
    first_stage = instantiate_from_config(config.model.params.first_stage_config)
    full = ckpt or config.model.params.get("ckpt_path", None)
    if full:
        prefix = "first_stage_model."
        weights = {k[len(prefix):]: v for k, v in load_state_dict(full).items() if k.startswith(prefix)}
        if weights:
            load_weights(first_stage, weights, strict=False, ignore_prefixes=("loss.",), source=full)
            logger.info("first stage: %d tensors from %s", len(weights), full)
    return freeze(first_stage)


def cache_split(args: argparse.Namespace, config: OmegaConf, first_stage: torch.nn.Module, split: str,
                device: torch.device) -> Path:
    """Writes (or finishes) the cache of ``data.params.<split>`` in ``<out>/<split>``; returns that directory."""
    if config.data.params.get(split, None) is None:
        raise KeyError(f"the config has no data.params.{split} to cache")
    with config_source(*args.config):
        dataset = instantiate_from_config(config.data.params[split])
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    image_key = args.image_key or config.model.params.get("first_stage_key", "image")
    source = {"config": [str(c) for c in args.config], "split": split, "limit": args.limit, "passes": args.passes,
              "dataset": OmegaConf.to_container(config.data.params[split], resolve=True)}
    plan = CachePlan(fingerprint=first_stage_fingerprint(first_stage), num_examples=len(dataset) * args.passes,
                     shard_size=args.shard_size, dtype=args.dtype, image_key=image_key, source=source)
    return CacheWriter(Path(args.out) / split, first_stage, dataset, plan, batch_size=args.batch_size,
                       num_workers=args.num_workers, device=device, seed=args.seed).write()


def main(argv: list[str] | None = None) -> Path:
    """Caches the splits; returns the path of the config that trains from them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args, overrides = parse_args(argv)
    config = OmegaConf.merge(load_config(*args.config), OmegaConf.from_dotlist(overrides))
    device = get_device(args.device)
    with config_source(*args.config):
        first_stage = build_first_stage(config, args.ckpt).to(device)
    for split in args.split:
        path = cache_split(args, config, first_stage, split, device)
        config.data.params[split] = {"target": "ldm.data.latent_cache.LatentCacheDataset",
                                     "params": {"path": str(path)}}
    if args.ckpt:
        config.model.params.ckpt_path = str(args.ckpt)
    trained = Path(args.out) / "config.yaml"
    OmegaConf.save(config, trained)
    logger.info("latent caches ready in %s; train from them with: python main.py --base %s -t", args.out, trained)
    return trained


if __name__ == "__main__":
    main()
