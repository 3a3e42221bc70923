"""Text-to-image sampling from a latent diffusion checkpoint, with classifier-free guidance.

Writes ``OUTDIR/samples/NNNNN.png`` for every image and ``OUTDIR/grid-NNNN.png`` for the run. Sizes beyond the
training size (``--H``/``--W``) sample convolutionally.

    python scripts/txt2img.py --prompt "a virus monster playing guitar" --config cfg.yaml --ckpt model.ckpt
    python scripts/txt2img.py --prompt "panda face" --run outputs/demo/logs/<time>_ldm   # a main.py run folder
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.inference import (
    add_lora_arguments, add_sampling_arguments, add_tile_argument, apply_finetuned_weights, configure_tiling,
    decode_to_uint8, downsampling_factor, ema_weights, get_device, load_model, model_files, run_script,
    sampling_options, save_grid, save_samples, seed_everything, text_conditioning,
)
from ldm.models.diffusion.sampling import sample


def read_prompts(opt: argparse.Namespace) -> list[str]:
    """The prompts of ``--from-file`` (one per line, blank lines skipped), else ``--prompt``."""
    if opt.from_file is None:
        if not opt.prompt.strip():
            raise ValueError("--prompt is empty")
        return [opt.prompt]
    path = Path(opt.from_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one prompt per line)")
    return prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    parser.add_argument("--from-file", dest="from_file", default=None, help="a file with one prompt per line")
    parser.add_argument("--negative_prompt", default="", help="the unconditional prompt of guidance")
    parser.add_argument("--H", type=int, default=None, help="image height in pixels (default: the training size)")
    parser.add_argument("--W", type=int, default=None, help="image width in pixels (default: the training size)")
    add_sampling_arguments(parser, outdir="outputs/txt2img-samples",
                           config="configs/latent-diffusion/txt2img-1p4B-eval.yaml",
                           ckpt="models/ldm/text2img-large/model.ckpt", scale=5.0)
    add_tile_argument(parser)
    add_lora_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    prompts = read_prompts(opt)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    apply_finetuned_weights(model, opt)
    f = downsampling_factor(model)
    opt.H, opt.W = opt.H or model.image_size * f, opt.W or model.image_size * f
    if opt.H % f or opt.W % f:
        raise ValueError(f"--H {opt.H} and --W {opt.W} must be multiples of the first stage's factor {f}")
    seed_everything(opt.seed)
    shape = (opt.n_samples, model.channels, opt.H // f, opt.W // f)
    configure_tiling(model, opt.tile, shape[2:], f)
    options = sampling_options(opt)
    images = []
    with torch.no_grad(), ema_weights(model):
        for prompt in prompts:
            for _ in range(opt.n_iter):
                c, uc = text_conditioning(model, [prompt] * opt.n_samples, opt.negative_prompt, opt.scale)
                z = sample(model, shape, c, uncond=uc, scale=opt.scale, options=options).samples
                batch = decode_to_uint8(model, z, opt.precision)
                save_samples(batch, opt.outdir)
                images.append(batch)
    grid = save_grid(np.concatenate(images), opt.outdir, opt.n_rows or opt.n_samples)
    print(f"samples in {Path(opt.outdir) / 'samples'}, grid {grid}")


if __name__ == "__main__":
    run_script(main)
