"""The main job on the embedded default: both stages trained on emoji from scratch, samples, measured quality.

    python scripts/demo.py                     # about 10 minutes on 2 CPU cores (README: the measured time)
    python scripts/demo.py --variant gpu --gpus 0,   # the scaled-up variant on one GPU

1. stage one: ``main.py`` trains the KL autoencoder of configs/demo/autoencoder.yaml on emoji rendered offline;
2. latent cache: ``scripts/cache_latents.py`` encodes the stage-two data once with that autoencoder (a few
   augmented passes), so that stage two neither renders nor encodes images at every step;
3. stage two: ``main.py`` trains the text-conditional LDM of configs/demo/ldm.yaml from the cache;
4. samples: 8 per prompt (the emoji names) with DDIM and classifier-free guidance; the first columns make a
   labelled grid, one row per prompt;
5. quality: FID against held-out renders and conditional accuracy (an independent classifier trained on real
   renders), written to metrics.json; ``--baselines`` adds the same measures for an untrained model and for real
   renders. The evaluated samples and the held-out renders are saved as samples.npz and reference.npz (uint8 NHWC,
   the format of scripts/evaluate.py).

The terminal shows one progress bar per stage and a summary; each run's merged config is saved in its run folder
(``--print_config`` prints it). A finished stage is reused when the script runs again with the same --outdir
(pass --retrain to redo it). The last lines give the commands to sample more, to open the notebook and to train
on your own images.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import load_checkpoint
from ldm.data.emoji import EmojiDataset
from ldm.evaluation.classifier import conditional_accuracy, train_classifier
from ldm.evaluation.fid import compute_fid
from ldm.evaluation.inception import load_extractor
from ldm.inference import get_device, labelled_grid, load_model, sample_prompts, to_uint8
from ldm.known_warnings import silence_known_warnings
from ldm.runs import project_config

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("demo")

# the loggers whose INFO lines (devices, seeds, learning-rate rule, data sizes) go to the run folders, not the screen
TRAINING_LOGGERS = ("main", "ldm", "pytorch_lightning", "lightning", "lightning.pytorch", "lightning.fabric",
                    "lightning_fabric", "cache_latents")

QUICK_DATA = ["data.params.train.params.max_classes=4", "data.params.validation.params.max_classes=4"]
QUICK_OVERRIDES = {
    "autoencoder": QUICK_DATA + ["lightning.trainer.max_steps=200", "lightning.trainer.val_check_interval=100",
                                 "lightning.trainer.log_every_n_steps=10",
                                 "lightning.callbacks.image_logger.params.batch_frequency=100"],
    "ldm": ["lightning.trainer.max_steps=400", "lightning.trainer.val_check_interval=200",
            "lightning.trainer.log_every_n_steps=10",
            "lightning.callbacks.image_logger.params.batch_frequency=200",
            "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=5"],
}
CACHE_PASSES = 4  # augmented copies of the training set in the latent cache


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", default="outputs/demo", help="where runs, samples and metrics go")
    p.add_argument("--variant", choices=("cpu", "gpu"), default="cpu",
                   help="gpu merges configs/demo/<stage>-gpu.yaml over each stage's config (larger, longer)")
    p.add_argument("--gpus", default=None, help="passed to main.py (e.g. '0,'); CPU when absent")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--samples-per-prompt", type=int, default=6, help="columns of the grid (at most --eval-per-class)")
    p.add_argument("--eval-per-class", type=int, default=8, help="samples per class for FID and accuracy")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--scale", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--classifier-steps", type=int, default=200)
    p.add_argument("--baselines", action="store_true",
                   help="also measure an untrained model and real renders (the README's reference rows)")
    p.add_argument("--quick", action="store_true",
                   help="4 classes and a few hundred steps: a smoke test that already beats the untrained model")
    p.add_argument("--retrain", action="store_true", help="train both stages again even if finished runs exist")
    p.add_argument("--print_config", action="store_true", help="print each stage's merged config")
    args = p.parse_args(argv)
    if args.samples_per_prompt > args.eval_per_class:
        p.error("--samples-per-prompt must be at most --eval-per-class (the grid shows evaluated samples)")
    return args


def stage_configs(name: str, args: argparse.Namespace) -> list[Path]:
    """configs/demo/<name>.yaml, plus its -gpu overlay for the gpu variant."""
    configs = [REPO / "configs" / "demo" / f"{name}.yaml"]
    if args.variant == "gpu":
        configs.append(REPO / "configs" / "demo" / f"{name}-gpu.yaml")
    return configs


def finished(outdir: Path, name: str, args: argparse.Namespace) -> Path | None:
    """The run (or cache) that an earlier call finished for this stage, unless --retrain."""
    done = outdir / f"{name}.done"
    if done.is_file() and not args.retrain:
        path = Path(done.read_text().strip())
        if path.exists():
            logger.info("%s: reusing %s", name, path)
            return path
    return None


def train_stage(name: str, outdir: Path, args: argparse.Namespace, configs: list[Path], extra: list[str]) -> Path:
    """Runs ``main.py`` (in this process) on `configs`, or reuses the finished run; returns the run folder."""
    reused = finished(outdir, name, args)
    if reused is not None:
        return reused
    from ldm.train import main as train_main

    logdir = outdir / "logs"
    argv = ["--base", *map(str, configs), "-t", "-l", str(logdir), "-n", name, "-s", str(args.seed),
            "--no-test", "True", "--print_config", str(args.print_config)]
    if args.gpus is not None:
        argv += ["--gpus", args.gpus]
    argv += extra + (QUICK_OVERRIDES[name] if args.quick else [])
    logger.debug("stage %s: main.py %s", name, shlex.join(argv))
    before = set(logdir.glob(f"*_{name}")) if logdir.is_dir() else set()
    train_main(argv)
    runs = sorted(set(logdir.glob(f"*_{name}")) - before)
    if not runs or not (runs[-1] / "checkpoints" / "last.ckpt").is_file():
        raise RuntimeError(f"stage {name} finished without writing {logdir}/*_{name}/checkpoints/last.ckpt")
    step = load_checkpoint(runs[-1] / "checkpoints" / "last.ckpt", mmap=True)["global_step"]
    trainer = OmegaConf.load(max((runs[-1] / "configs").glob("*-lightning.yaml"))).lightning.trainer
    wanted = trainer.get("max_steps", None) or -1
    if step < wanted:  # stopped early (a signal): not a finished stage
        raise RuntimeError(f"stage {name} stopped at step {step} of {wanted}; its state is in {runs[-1]} "
                           f"(python main.py -r {runs[-1]} -t resumes it)")
    (outdir / f"{name}.done").write_text(str(runs[-1].resolve()))
    return runs[-1].resolve()


def cache_latents(outdir: Path, args: argparse.Namespace, ae_ckpt: Path) -> Path:
    """Encodes stage two's data with the trained autoencoder (scripts/cache_latents.py); returns the config that
    trains from the cache."""
    reused = finished(outdir, "cache", args)
    if reused is not None:
        return reused
    spec = importlib.util.spec_from_file_location("cache_latents", REPO / "scripts" / "cache_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache_dir = outdir / "cache" / ae_ckpt.parent.parent.name  # one cache per stage-one run
    argv = ["--config", *map(str, stage_configs("ldm", args)), "--out", str(cache_dir),
            "--split", "train", "validation", "--passes", str(CACHE_PASSES), "--batch-size", "64",
            "--seed", str(args.seed), f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}"]
    if args.gpus is None:
        argv += ["--device", "cpu"]
    config = Path(module.main(argv + (QUICK_DATA if args.quick else []))).resolve()
    (outdir / "cache.done").write_text(str(config))
    return config


def stage_two_data(args: argparse.Namespace) -> DictConfig:
    """The emoji dataset parameters of stage two (what the cache holds), with the quick run's class limit."""
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in stage_configs("ldm", args)],
                             OmegaConf.from_dotlist(QUICK_DATA if args.quick else []))
    return config.data.params.train.params


@torch.no_grad()
def real_renders(data: DictConfig, split: str, n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of every class of stage two's data, for another split: ([N x 3 x H x W] in [-1, 1], [N] labels)."""
    params = dict(OmegaConf.to_container(data))
    params.update(split=split, repeats=n_per_class, length=None)
    ds = EmojiDataset(**params)
    items = [ds[i] for i in range(len(ds))]
    images = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)
    return images, torch.tensor([it["class_label"] for it in items])


def measure(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], reference: torch.Tensor, classifier,
            extractor) -> dict[str, dict[str, float]]:
    """FID against `reference` and conditional accuracy of each named set of (images, intended labels)."""
    results = {}
    for name, (images, labels) in sets.items():
        fid = compute_fid(to_uint8(images), to_uint8(reference), extractor=extractor)
        accuracy = conditional_accuracy(classifier, images, labels)
        results[name] = {"fid": round(float(fid), 3), "accuracy": round(accuracy, 4)}
    return results


def shown(path: Path) -> str:
    """`path` relative to the working directory when inside it (shorter commands), quoted for a shell."""
    try:
        path = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return shlex.quote(str(path))


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def summary(metrics: dict, outdir: Path, ldm_run: Path, prompt: str) -> str:
    """The last lines on the screen: results, where everything is, what to run next."""
    t = metrics["timings"]
    lines = [f"\nDemo finished in {minutes(t['total_s'])} (process CPU time {minutes(t['cpu_s'])}, "
             f"{torch.get_num_threads()} threads).",
             f"Quality ({metrics['samples_per_set']} samples per set, {metrics['classes']} classes, DDIM "
             f"{metrics['ddim_steps']} steps, guidance {metrics['guidance_scale']:g}; FID with "
             f"{metrics['feature_extractor']}):",
             f"  {'':10s} {'FID':>8s} {'accuracy':>9s}"]
    lines += [f"  {name:10s} {r['fid']:8.1f} {100 * r['accuracy']:8.1f}%" for name, r in metrics["results"].items()]
    lines += [f"Everything is in {shown(outdir)}/:",
              "  samples_grid.png   one row per prompt          metrics.json   these numbers and the timings",
              f"  logs/{Path(metrics['runs']['autoencoder']).name}/   stage one (checkpoints/, configs/, images/)",
              f"  logs/{Path(metrics['runs']['ldm']).name}/   stage two (checkpoints/, configs/, images/)",
              "Next:",
              f"  sample more:       python {shown(REPO / 'scripts' / 'txt2img.py')} --run {shown(ldm_run)} "
              f"--prompt {shlex.quote(prompt)} "
              f"--n_samples 8 --scale {metrics['guidance_scale']:g} --ddim_steps {metrics['ddim_steps']} "
              f"--outdir {shown(outdir / 'more-samples')}",
              f"  open the notebook: DEMO_RUN={shown(ldm_run)} jupyter notebook "
              f"{shown(REPO / 'notebooks' / 'demo.ipynb')}",
              f"  your own images:   {shown(REPO / 'docs' / 'custom-data.md')} (a folder of images with captions, "
              f"both stages, sampling)"]
    return "\n".join(lines)


def quiet_logging() -> None:
    """The demo's own lines on the screen; the training stack's INFO lines stay out (its warnings do not)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in TRAINING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_known_warnings()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.samples_per_prompt, args.eval_per_class, args.classifier_steps = 10, 2, 8, 100
    quiet_logging()
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    timings, t0, c0 = {}, time.time(), time.process_time()

    def lap(name: str, since: tuple[float, float]) -> tuple[float, float]:
        """Records the wall and process CPU time since `since`; returns now."""
        timings[f"{name}_s"] = round(time.time() - since[0], 1)
        timings[f"{name}_cpu_s"] = round(time.process_time() - since[1], 1)
        logger.debug("%s: %s", name, timings)
        return time.time(), time.process_time()

    ae_run = train_stage("autoencoder", outdir, args, stage_configs("autoencoder", args), [])
    ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
    t = lap("stage_one", (t0, c0))
    cached = cache_latents(outdir, args, ae_ckpt)
    t = lap("latent_cache", t)
    ldm_run = train_stage("ldm", outdir, args, [cached], [])
    t = lap("stage_two", t)

    device = get_device() if args.gpus is not None else torch.device("cpu")
    config = project_config(ldm_run)
    model = load_model(config, ldm_run / "checkpoints" / "last.ckpt", device=device, strict=True)
    data = stage_two_data(args)
    prompts = list(EmojiDataset(**{**OmegaConf.to_container(data), "split": "test", "repeats": 1}).captions)
    per_class = args.eval_per_class
    labels = torch.arange(len(prompts)).repeat_interleave(per_class)
    trained = sample_prompts(model, prompts, per_class, steps=args.steps, scale=args.scale,
                             seed=args.seed + 1)
    # the grid shows the first evaluated samples of each prompt
    columns = trained.view(len(prompts), per_class, *trained.shape[1:])[:, :args.samples_per_prompt]
    grid_path = outdir / "samples_grid.png"
    labelled_grid(to_uint8(columns.flatten(0, 1)), prompts, args.samples_per_prompt).save(grid_path)
    sets = {"trained": (trained, labels)}
    if args.baselines:
        untrained = load_model(config, None, device=device)
        sets["untrained"] = (sample_prompts(untrained, prompts, per_class, steps=args.steps,
                                            scale=args.scale, seed=args.seed + 1, desc="sampling (untrained)"), labels)
        sets["real"] = real_renders(data, "validation", per_class)
    t = lap("sampling", t)

    train_images, train_labels = real_renders(data, "train", 8 if args.quick else 32)
    classifier = train_classifier(train_images, train_labels, len(prompts), steps=args.classifier_steps,
                                  seed=args.seed, disable_progress=True)
    reference, _ = real_renders(data, "test", per_class)
    np.savez(outdir / "samples.npz", arr_0=to_uint8(trained), arr_1=labels.numpy())
    np.savez(outdir / "reference.npz", arr_0=to_uint8(reference))
    extractor = load_extractor()
    results = measure(sets, reference, classifier, extractor)
    lap("evaluation", t)
    timings["total_s"] = round(time.time() - t0, 1)
    timings["cpu_s"] = round(time.process_time() - c0, 1)

    metrics = {"samples_per_set": int(labels.numel()), "classes": len(prompts), "sampler": "ddim",
               "ddim_steps": args.steps, "guidance_scale": args.scale, "feature_extractor": extractor.name,
               "reference": "held-out emoji renders (test split)", "results": results, "timings": timings,
               "threads": torch.get_num_threads(),
               "runs": {"autoencoder": str(ae_run), "ldm": str(ldm_run)}, "latent_cache": str(cached),
               "grid": str(grid_path)}
    (outdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(summary(metrics, outdir, ldm_run, prompts[min(3, len(prompts) - 1)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
