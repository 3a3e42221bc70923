"""The main job on the embedded default: both stages trained on emoji from scratch, samples, measured quality.

    python scripts/demo.py                     # about 10-15 minutes on 2 CPU cores
    python scripts/demo.py --variant gpu --gpus 0,   # the scaled-up variant on one GPU

1. stage one: ``main.py`` trains the KL autoencoder of configs/demo/autoencoder.yaml on emoji rendered offline;
2. stage two: ``main.py`` trains the text-conditional LDM of configs/demo/ldm.yaml on its latents;
3. samples: a labelled grid, one row per prompt (the emoji names), with DDIM and classifier-free guidance;
4. quality: FID against held-out renders and conditional accuracy (an independent classifier trained on real
   renders), for the trained model, an untrained model and real renders, printed and written to metrics.json;
   the evaluated samples and the held-out renders are saved as samples.npz and reference.npz (uint8 NHWC, the
   format of scripts/evaluate.py).

A finished stage is reused when the script runs again with the same --outdir (pass --retrain to redo it).
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ldm.data.emoji import EmojiDataset
from ldm.evaluation.classifier import conditional_accuracy, train_classifier
from ldm.evaluation.fid import compute_fid
from ldm.evaluation.inception import load_extractor
from ldm.inference import get_device, load_model, text_conditioning, to_uint8
from ldm.models.diffusion.sampling import SamplingOptions, sample

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("demo")

QUICK_DATA = ["data.params.train.params.max_classes=4", "data.params.validation.params.max_classes=4"]
QUICK_OVERRIDES = {
    "autoencoder": QUICK_DATA + ["lightning.trainer.max_steps=200", "lightning.trainer.val_check_interval=100",
                    "lightning.callbacks.image_logger.params.batch_frequency=100"],
    "ldm": QUICK_DATA + ["lightning.trainer.max_steps=400", "lightning.trainer.val_check_interval=200",
            "lightning.callbacks.image_logger.params.batch_frequency=200",
            "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=5"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="outputs/demo", help="where runs, samples and metrics go")
    p.add_argument("--variant", choices=("cpu", "gpu"), default="cpu",
                   help="gpu merges configs/demo/<stage>-gpu.yaml over each stage's config (larger, longer)")
    p.add_argument("--gpus", default=None, help="passed to main.py (e.g. '0,'); CPU when absent")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--samples-per-prompt", type=int, default=6, help="columns of the grid")
    p.add_argument("--eval-per-class", type=int, default=8, help="samples per class for FID and accuracy")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--classifier-steps", type=int, default=200)
    p.add_argument("--quick", action="store_true",
                   help="4 classes and a few hundred steps: a smoke test that already beats the untrained model")
    p.add_argument("--retrain", action="store_true", help="train both stages again even if finished runs exist")
    return p.parse_args(argv)


def train_stage(name: str, outdir: Path, args: argparse.Namespace, extra: list[str]) -> Path:
    """Runs ``main.py`` on configs/demo/<name>.yaml (plus its -gpu overlay), or reuses the finished run; returns
    the run directory."""
    done = outdir / f"{name}.done"
    if done.is_file() and not args.retrain:
        rundir = Path(done.read_text().strip())
        if (rundir / "checkpoints" / "last.ckpt").is_file():
            logger.info("stage %s: reusing the finished run %s", name, rundir)
            return rundir
    logdir = outdir / "logs"
    configs = [REPO / "configs" / "demo" / f"{name}.yaml"]
    if args.variant == "gpu":
        configs.append(REPO / "configs" / "demo" / f"{name}-gpu.yaml")
    cmd = [sys.executable, str(REPO / "main.py"), "--base", *map(str, configs), "-t", "-l", str(logdir), "-n", name,
           "-s", str(args.seed), "--no-test", "True"]
    if args.gpus is not None:
        cmd += ["--gpus", args.gpus]
    cmd += extra + (QUICK_OVERRIDES[name] if args.quick else [])
    logger.info("stage %s: %s", name, " ".join(cmd))
    before = set(logdir.glob(f"*_{name}")) if logdir.is_dir() else set()
    subprocess.run(cmd, cwd=REPO, check=True)
    runs = sorted(set(logdir.glob(f"*_{name}")) - before)
    if not runs or not (runs[-1] / "checkpoints" / "last.ckpt").is_file():
        raise RuntimeError(f"stage {name} finished without writing {logdir}/*_{name}/checkpoints/last.ckpt")
    done.write_text(str(runs[-1].resolve()))
    return runs[-1]


def project_config(rundir: Path) -> Path:
    """The merged config that main.py saved for a run."""
    configs = sorted((rundir / "configs").glob("*-project.yaml"))
    if not configs:
        raise FileNotFoundError(f"no merged config in {rundir / 'configs'}")
    return configs[-1]


@torch.no_grad()
def sample_prompts(model, prompts: list[str], per_prompt: int, args: argparse.Namespace, seed: int,
                   batch_size: int = 64) -> torch.Tensor:
    """Images for each prompt: [len(prompts) * per_prompt x 3 x H x W] in [-1, 1], prompt-major."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    wanted = [p for p in prompts for _ in range(per_prompt)]
    options = SamplingOptions(sampler="ddim", steps=args.steps, precision="autocast")
    images = []
    for i in tqdm(range(0, len(wanted), batch_size), desc="sampling", unit="batch"):
        chunk = wanted[i:i + batch_size]
        shape = model.latent_shape(len(chunk))
        x_T = torch.randn(shape, generator=gen).to(device)
        with model.ema_scope():
            cond, uncond = text_conditioning(model, chunk, scale=args.scale)
            z = sample(model, shape, cond, uncond=uncond, scale=args.scale, options=options, x_T=x_T).samples
            images.append(model.decode_first_stage(z).float().clamp(-1, 1).cpu())
    return torch.cat(images)


def labelled_grid(images: np.ndarray, labels: list[str], per_row: int, zoom: int = 2) -> Image.Image:
    """One row per label: the label, then `per_row` images ([N x H x W x 3] uint8, label-major), zoomed."""
    h, w = images.shape[1:3]
    cell, pad = (h * zoom, w * zoom), 2
    font = ImageFont.load_default(size=14)
    text_w = 12 + int(max(font.getlength(label) for label in labels))
    grid = Image.new("RGB", (text_w + per_row * (cell[0] + pad), len(labels) * (cell[1] + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        y = r * (cell[1] + pad)
        draw.text((6, y + cell[1] // 2), label, fill="black", font=font, anchor="lm")
        for c in range(per_row):
            tile = Image.fromarray(images[r * per_row + c]).resize(cell, Image.Resampling.NEAREST)
            grid.paste(tile, (text_w + c * (cell[0] + pad), y))
    return grid


def emoji_dataset(config: Path, split: str, repeats: int) -> EmojiDataset:
    """The emoji of the run's training data (same size and classes), for another split."""
    params = dict(OmegaConf.to_container(OmegaConf.load(config).data.params.train.params))
    params.update(split=split, repeats=repeats, length=None)
    return EmojiDataset(**params)


def real_renders(config: Path, split: str, n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of every class: ([N x 3 x H x W] in [-1, 1], [N] labels)."""
    ds = emoji_dataset(config, split, n_per_class)
    items = [ds[i] for i in range(len(ds))]
    images = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)
    return images, torch.tensor([it["class_label"] for it in items])


def measure(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], reference: torch.Tensor, classifier,
            extractor) -> dict[str, dict[str, float]]:
    """FID against `reference` and conditional accuracy of each named set of (images, intended labels)."""
    results = {}
    for name, (images, labels) in sets.items():
        fid = compute_fid(to_uint8(images), to_uint8(reference), extractor=extractor)
        results[name] = {"fid": round(float(fid), 3), "accuracy": round(conditional_accuracy(classifier, images, labels), 4)}
        logger.info("%-10s FID %.2f  accuracy %.1f%%", name, fid, 100 * results[name]["accuracy"])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.samples_per_prompt, args.eval_per_class, args.classifier_steps = 10, 2, 8, 100
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings, t0 = {}, time.time()

    ae_run = train_stage("autoencoder", outdir, args, [])
    ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
    timings["stage_one_s"] = round(time.time() - t0, 1)
    ldm_run = train_stage("ldm", outdir, args, [f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}"])
    timings["stage_two_s"] = round(time.time() - t0 - timings["stage_one_s"], 1)

    t1 = time.time()
    device = get_device() if args.gpus is not None else torch.device("cpu")
    config = project_config(ldm_run)
    model = load_model(config, ldm_run / "checkpoints" / "last.ckpt", device=device, strict=True)
    untrained = load_model(config, None, device=device)
    prompts = emoji_dataset(config, "test", 1).captions
    per_class = args.eval_per_class

    grid_images = sample_prompts(model, prompts, args.samples_per_prompt, args, seed=args.seed)
    grid_path = outdir / "samples_grid.png"
    labelled_grid(to_uint8(grid_images), prompts, args.samples_per_prompt).save(grid_path)
    labels = torch.arange(len(prompts)).repeat_interleave(per_class)
    trained = sample_prompts(model, prompts, per_class, args, seed=args.seed + 1)
    baseline = sample_prompts(untrained, prompts, per_class, args, seed=args.seed + 1)
    timings["sampling_s"] = round(time.time() - t1, 1)

    t2 = time.time()
    train_images, train_labels = real_renders(config, "train", 8 if args.quick else 32)
    classifier = train_classifier(train_images, train_labels, len(prompts), steps=args.classifier_steps,
                                  seed=args.seed)
    reference, _ = real_renders(config, "test", per_class)
    np.savez(outdir / "samples.npz", arr_0=to_uint8(trained), arr_1=labels.numpy())
    np.savez(outdir / "reference.npz", arr_0=to_uint8(reference))
    extractor = load_extractor()
    results = measure({"trained": (trained, labels), "untrained": (baseline, labels),
                       "real": real_renders(config, "validation", per_class)}, reference, classifier, extractor)
    timings["evaluation_s"] = round(time.time() - t2, 1)
    timings["total_s"] = round(time.time() - t0, 1)

    metrics = {"samples_per_set": int(labels.numel()), "classes": len(prompts), "sampler": "ddim",
               "ddim_steps": args.steps, "guidance_scale": args.scale, "feature_extractor": extractor.name,
               "reference": "held-out emoji renders (test split)", "results": results, "timings": timings,
               "runs": {"autoencoder": str(ae_run), "ldm": str(ldm_run)}, "grid": str(grid_path)}
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nStage one run:  {ae_run}\nStage two run:  {ldm_run}\nSample grid:    {grid_path}\n"
          f"Metrics:        {outdir / 'metrics.json'}  (FID with {extractor.name}, {labels.numel()} samples each)")
    print(f"{'':10s} {'FID':>8s} {'accuracy':>9s}")
    for name, r in results.items():
        print(f"{name:10s} {r['fid']:8.2f} {100 * r['accuracy']:8.1f}%")
    print(f"total time {timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
