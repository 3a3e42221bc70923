#!/usr/bin/env python
"""DreamBooth (Ruiz et al. 2023) on the demo text-to-emoji model: teach it one emoji it never saw, bound to a
rare token, while prior-preservation images that the model generates itself keep what it knew; then measure.

    python scripts/demo.py --outdir outputs/demo                     # the base model (once)
    python scripts/dreambooth.py --demo-run outputs/demo --subject sunflower --outdir outputs/dreambooth
    python scripts/dreambooth.py --demo-run outputs/demo --lora 4 ...   # LoRA rank 4 instead of the full UNet

1. identifier: among a few candidates, the single word piece of the text encoder's vocabulary whose encoding is
   farthest from every trained caption; the instance prompt is the identifier alone;
2. data (``<outdir>/data``): ``--instances`` renders of the subject, and ``--prior-per-prompt`` samples of the base
   model for each of its prompts (DDIM, guidance, EMA weights), mixed 1:1 by repeating the instance rows;
3. first stage: the subject may lie outside what the autoencoder was trained on (the demo's decoder renders the
   sunflower's latent as a brown blob, so no UNet could show it); ``--decoder-steps`` of
   :func:`ldm.finetune.decoder.adapt_decoder` teach a copy of the decoder the instance and prior images, with the
   encoder (the latent space the base model lives in) unchanged (``<outdir>/first_stage.ckpt``);
4. fine-tuning with ``main.py``: the demo run's config with a warm start from its EMA weights (the first stage from
   step 3) and either the UNet trained (``finetune.train``) or LoRA adapters (``lora``; the adapters are written
   to ``<run>/lora.safetensors``);
5. measurement (``<outdir>/metrics.json``, ``<outdir>/grid.png``), before and after: a classifier trained on real
   renders of the trained emoji plus the subject says how many samples of the identifier show the subject, how
   accurate the trained prompts stay, and how many of their samples turned into the subject (leakage); the mean
   pixel distance of identifier samples to their nearest subject render, and the share of the first stage's
   reconstructions of held-out subject renders that show the subject (the most its decoder allows), are reported too.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import save_checkpoint
from ldm.data.emoji import EmojiDataset
from ldm.data.folder import ImageFolderDataset
from ldm.data.latent_cache import LatentCacheDataset, read_manifest
from ldm.evaluation.classifier import conditional_accuracy, predict, train_classifier
from ldm.finetune.decoder import adapt_decoder
from ldm.finetune.lora import load_lora_for_sampling
from ldm.inference import labelled_grid, load_first_stage, load_model, sample_prompts, to_uint8
from ldm.runs import project_config

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = ("sks", "xiv", "qu", "wren", "zed", "olm", "vik", "tal")
logger = logging.getLogger("dreambooth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-run", default=None, help="the --outdir of scripts/demo.py (its ldm.done names the run)")
    p.add_argument("--config", default=None, help="instead of --demo-run: the base model's merged config")
    p.add_argument("--ckpt", default=None, help="instead of --demo-run: the base model's checkpoint")
    p.add_argument("--subject", default="sunflower", help="an emoji (name or character) the model was not trained on")
    p.add_argument("--token", default=None, help="the identifier (default: chosen among rare word pieces)")
    p.add_argument("--outdir", default="outputs/dreambooth")
    p.add_argument("--instances", type=int, default=5, help="renders of the subject to fine-tune on")
    p.add_argument("--prior-per-prompt", type=int, default=8, help="prior-preservation samples per trained prompt")
    p.add_argument("--new-data", action="store_true", help="write <outdir>/data again even if it exists")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (not scaled by the batch size)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank (0: fine-tune the whole UNet)")
    p.add_argument("--decoder-steps", type=int, default=150,
                   help="steps adapting the first stage's decoder to the instance and prior images (0: keep it)")
    p.add_argument("--decoder-lr", type=float, default=3e-4)
    p.add_argument("--eval-per-prompt", type=int, default=16, help="samples per prompt for the measurement")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--classifier-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--gpus", default=None, help="passed to main.py (e.g. '0,'); CPU when absent")
    args = p.parse_args(argv)
    if (args.demo_run is None) == (args.config is None or args.ckpt is None):
        p.error("give --demo-run, or both --config and --ckpt")
    return args


def base_model_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """(merged config, checkpoint) of the model to fine-tune."""
    if args.demo_run is None:
        return Path(args.config), Path(args.ckpt)
    done = Path(args.demo_run) / "ldm.done"
    if not done.is_file():
        raise FileNotFoundError(f"{done} not found: run scripts/demo.py --outdir {args.demo_run} first")
    run = Path(done.read_text().strip())
    return project_config(run), run / "checkpoints" / "last.ckpt"


@torch.no_grad()
def choose_token(model, captions: list[str], candidates: tuple[str, ...] = CANDIDATES) -> str:
    """The candidate that is one word piece of the conditioner's tokenizer and whose encoding is farthest (L2 over
    the whole [L x D] encoding) from that of every caption."""
    tokenizer = model.cond_stage_model.tokenizer
    single = [c for c in candidates if len(tokenizer.tokenize(c)) == 1]
    if not single:
        raise ValueError(f"none of the identifier candidates {candidates} is a single word piece; pass --token")
    enc = model.get_learned_conditioning(single + captions).flatten(1).float()
    distance = torch.cdist(enc[:len(single)], enc[len(single):]).min(dim=1).values
    return single[int(distance.argmax())]


def emoji_params(config: Path) -> dict:
    """The EmojiDataset parameters of the run's training data; for a run that trained from a latent cache (the
    demo's stage two), those of the dataset the cache was made from (its manifest records it)."""
    train = OmegaConf.load(config).data.params.train
    if train.target == f"{LatentCacheDataset.__module__}.{LatentCacheDataset.__name__}":
        train = OmegaConf.create(read_manifest(train.params.path)["source"]["dataset"])
    return dict(OmegaConf.to_container(train.params, resolve=True))


def emoji_dataset(config: Path, split: str, repeats: int, **overrides: Any) -> EmojiDataset:
    """The emoji of the run's training data (same size and classes, or `overrides`), for another split."""
    return EmojiDataset(**{**emoji_params(config), "split": split, "repeats": repeats, "length": None, **overrides})


def subject_renders(config: Path, subject: str, split: str, n: int) -> torch.Tensor:
    """[n x 3 x H x W] renders of `subject` in [-1, 1], augmented as the run's training data."""
    ds = emoji_dataset(config, split, n, names=[subject])
    return torch.from_numpy(np.stack([ds[i]["image"] for i in range(n)])).permute(0, 3, 1, 2)


def save_png(image: torch.Tensor, path: Path) -> None:
    Image.fromarray(to_uint8(image[None])[0]).save(path)


def write_data(root: Path, token: str, instances: torch.Tensor, priors: torch.Tensor, prompts: list[str],
               per_prompt: int) -> None:
    """PNGs and ``train.jsonl`` / ``validation.jsonl`` (instance rows repeated to match the prior rows 1:1)."""
    root.mkdir(parents=True, exist_ok=True)
    instance_rows = []
    for i, image in enumerate(instances):
        save_png(image, root / f"instance-{i:03d}.png")
        instance_rows.append({"file_name": f"instance-{i:03d}.png", "caption": token})
    prior_rows = []
    for i, image in enumerate(priors):
        save_png(image, root / f"prior-{i:04d}.png")
        prior_rows.append({"file_name": f"prior-{i:04d}.png", "caption": prompts[i // per_prompt]})
    repeats = max(1, round(len(prior_rows) / len(instance_rows)))
    train = instance_rows * repeats + prior_rows
    validation = instance_rows + prior_rows[::per_prompt]
    for name, rows in (("train", train), ("validation", validation)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("data: %d instance renders x %d and %d prior samples in %s", len(instance_rows), repeats,
                len(prior_rows), root)


def training_images(data: Path, size: int) -> torch.Tensor:
    """[N x 3 x H x W] in [-1, 1]: the rows of ``train.jsonl`` (instances repeated as there), read as the
    fine-tune reads them."""
    ds = ImageFolderDataset(str(data), size=size, captions="jsonl:train.jsonl", seed=0)
    return torch.from_numpy(np.stack([ds[i]["image"] for i in range(len(ds))])).permute(0, 3, 1, 2)


def adapt_first_stage(model, config: Path, data: Path, args: argparse.Namespace) -> Path | None:
    """Adapts a copy of the base model's first-stage decoder to the training images (the subject may lie outside
    what the autoencoder was trained on; the encoder, and so the latent space, stays) and writes it to
    ``<outdir>/first_stage.ckpt``; None with ``--decoder-steps 0``."""
    if args.decoder_steps <= 0:
        return None
    first_stage = copy.deepcopy(model.first_stage_model)
    images = training_images(data, int(emoji_params(config).get("size", 32)))
    adapt_decoder(first_stage, images, args.decoder_steps, lr=args.decoder_lr, seed=args.seed)
    path = Path(args.outdir).resolve() / "first_stage.ckpt"
    save_checkpoint({"state_dict": first_stage.state_dict()}, path)
    return path


def finetune_config(config: Path, ckpt: Path, data: Path, args: argparse.Namespace,
                    first_stage: Path | None = None) -> Path:
    """The base run's config with the warm start, the trained part, the folder data and a short schedule set;
    with `first_stage` (an adapted first stage) the first stage is loaded from it instead of the base checkpoint."""
    cfg = OmegaConf.load(config)
    size = int(emoji_params(config).get("size", 32))
    params = cfg.model.params
    params.warm_start = {"path": str(ckpt.resolve()), "from_ema": True}
    if first_stage is not None:
        params.first_stage_config.params.ckpt_path = str(first_stage)
        params.warm_start.ignore = ["first_stage_model."]
    params.ema_schedule = {"kind": "power", "power": 0.75}
    if args.lora:
        params.lora = {"rank": args.lora}
    else:
        params.finetune = {"train": ["model.diffusion_model"]}
    params.pop("ckpt_path", None)
    cfg.model.base_learning_rate = args.lr
    folder = {"target": "ldm.data.folder.ImageFolderDataset", "params": {"root": str(data), "size": size}}
    cfg.data.params.batch_size = args.batch_size
    cfg.data.params.train = OmegaConf.merge(folder, {"params": {"captions": "jsonl:train.jsonl", "seed": None}})
    cfg.data.params.validation = OmegaConf.merge(folder, {"params": {"captions": "jsonl:validation.jsonl",
                                                                     "seed": 0}})
    cfg.lightning = {"trainer": {"max_steps": args.train_steps, "val_check_interval": args.train_steps,
                                 "check_val_every_n_epoch": None, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                                 "log_every_n_steps": 25, "enable_model_summary": False},
                     "callbacks": {"image_logger": {  # one small grid at the end (the measurement samples later)
                         "target": "main.ImageLogger",
                         "params": {"batch_frequency": args.train_steps, "max_images": 8, "increase_log_steps": False,
                                    "log_images_kwargs": {"N": 8, "ddim_steps": 10, "inpaint": False,
                                                          "plot_progressive_rows": False,
                                                          "plot_diffusion_rows": False,
                                                          "quantize_denoised": False}}}}}
    path = Path(args.outdir) / "finetune.yaml"
    OmegaConf.save(cfg, path)
    return path


def fine_tune(config: Path, args: argparse.Namespace) -> Path:
    """Runs main.py on `config`; returns the run folder."""
    logdir = Path(args.outdir).resolve() / "logs"
    cmd = [sys.executable, str(REPO / "main.py"), "--base", str(config), "-t", "-l", str(logdir), "-n", "dreambooth",
           "-s", str(args.seed), "--scale_lr", "False", "--no-test", "True"]
    if args.gpus is not None:
        cmd += ["--gpus", args.gpus]
    before = set(logdir.glob("*_dreambooth")) if logdir.is_dir() else set()
    logger.info("fine-tuning: %s", " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)
    runs = sorted(set(logdir.glob("*_dreambooth")) - before)
    if not runs or not (runs[-1] / "checkpoints" / "last.ckpt").is_file():
        raise RuntimeError(f"fine-tuning finished without writing {logdir}/*_dreambooth/checkpoints/last.ckpt")
    return runs[-1]


@torch.no_grad()
def evaluate(model, token: str, prompts: list[str], classifier, subject: torch.Tensor,
             args: argparse.Namespace) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Subject share, nearest-subject distance, accuracy and leakage of one model, and the share of its first
    stage's reconstructions of the held-out `subject` renders classified as the subject (what its decoder can
    show at best); also returns its samples."""
    n = args.eval_per_prompt
    reconstructed = model.decode_first_stage(model.get_first_stage_encoding(model.encode_first_stage(subject)))
    mine = sample_prompts(model, [token], n, steps=args.steps, scale=args.scale, seed=args.seed + 1)
    others = sample_prompts(model, prompts, n, steps=args.steps, scale=args.scale, seed=args.seed + 2)
    subject_class = len(prompts)
    labels = torch.arange(len(prompts)).repeat_interleave(n)
    nearest = torch.cdist(mine.flatten(1), subject.flatten(1)).min(dim=1).values / mine[0].numel() ** 0.5
    result = {"subject_share": (predict(classifier, mine) == subject_class).float().mean().item(),
              "first_stage_subject_share": (predict(classifier, reconstructed.clamp(-1, 1)) == subject_class)
              .float().mean().item(),
              "subject_rms_distance": nearest.mean().item(),
              "prompt_accuracy": conditional_accuracy(classifier, others, labels),
              "leakage": (predict(classifier, others) == subject_class).float().mean().item()}
    return {k: round(v, 4) for k, v in result.items()}, mine, others


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings, t0 = {}, time.time()
    config, ckpt = base_model_files(args)
    base = load_model(config, ckpt, device="cpu", strict=True)
    prompts = emoji_dataset(config, "test", 1).captions
    token = args.token or choose_token(base, prompts)
    logger.info("identifier %r for %s", token, args.subject)

    if (outdir / "data" / "train.jsonl").is_file() and not args.new_data:
        logger.info("reusing the instance and prior images in %s (--new-data writes them again)", outdir / "data")
    else:
        instances = subject_renders(config, args.subject, "train", args.instances)
        priors = sample_prompts(base, prompts, args.prior_per_prompt, steps=args.steps, scale=args.scale,
                                seed=args.seed)
        write_data(outdir / "data", token, instances, priors, prompts, args.prior_per_prompt)
    timings["data_s"] = round(time.time() - t0, 1)

    t1 = time.time()
    first_stage = adapt_first_stage(base, config, (outdir / "data").resolve(), args)
    timings["decoder_s"] = round(time.time() - t1, 1)
    t1 = time.time()
    run = fine_tune(finetune_config(config, ckpt, (outdir / "data").resolve(), args, first_stage), args)
    timings["fine_tune_s"] = round(time.time() - t1, 1)

    t2 = time.time()
    if args.lora:
        tuned = load_lora_for_sampling(load_model(config, ckpt, device="cpu", strict=True), run / "lora.safetensors")
        if first_stage is not None:
            load_first_stage(tuned, first_stage)
    else:
        tuned = load_model(project_config(run), run / "checkpoints" / "last.ckpt", device="cpu", strict=True)
    names = list(prompts) + [args.subject]
    real = emoji_dataset(config, "train", 32)
    real_images, real_labels = (torch.from_numpy(np.stack([real[i]["image"] for i in range(len(real))])),
                                torch.tensor([real[i]["class_label"] for i in range(len(real))]))
    subject_train = subject_renders(config, args.subject, "train", 32)
    classifier = train_classifier(torch.cat([real_images.permute(0, 3, 1, 2), subject_train]),
                                  torch.cat([real_labels, torch.full((32,), len(prompts))]), len(names),
                                  steps=args.classifier_steps, seed=args.seed)
    subject_test = subject_renders(config, args.subject, "test", 32)
    results = {}
    samples = {}
    for name, model in (("before", base), ("after", tuned)):
        results[name], mine, others = evaluate(model, token, prompts, classifier, subject_test, args)
        samples[name] = (mine, others)
        logger.info("%s: %s", name, results[name])
    timings["evaluation_s"] = round(time.time() - t2, 1)

    per_row = min(8, args.eval_per_prompt)
    rows = [samples["before"][0][:per_row], samples["after"][0][:per_row]]
    rows += [samples["after"][1][i * args.eval_per_prompt:i * args.eval_per_prompt + per_row]
             for i in range(len(prompts))]
    labelled_grid(to_uint8(torch.cat(rows)), [f"{token} (before)", f"{token} (after)"] + prompts,
                  per_row).save(outdir / "grid.png")
    metrics = {"subject": args.subject, "token": token, "mode": f"lora rank {args.lora}" if args.lora else "unet",
               "instances": args.instances, "prior_per_prompt": args.prior_per_prompt,
               "decoder_steps": args.decoder_steps, "decoder_lr": args.decoder_lr,
               "train_steps": args.train_steps, "batch_size": args.batch_size, "lr": args.lr,
               "eval_per_prompt": args.eval_per_prompt, "ddim_steps": args.steps, "guidance_scale": args.scale,
               "classifier": f"SmallClassifier on real renders of {len(names)} emoji", "results": results,
               "run": str(run), "timings": timings}
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"identifier {token!r} for {args.subject}; run {run}")
    print(f"{'':8s} {'subject':>8s} {'distance':>9s} {'accuracy':>9s} {'leakage':>8s} {'decoder':>8s}")
    for name, r in results.items():
        print(f"{name:8s} {100 * r['subject_share']:7.1f}% {r['subject_rms_distance']:9.3f} "
              f"{100 * r['prompt_accuracy']:8.1f}% {100 * r['leakage']:7.1f}% "
              f"{100 * r['first_stage_subject_share']:7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
