"""Super-resolution with a latent diffusion model conditioned on the low-resolution image (as bsr_sr).

The LR image, in [-1, 1], is concatenated to the latent at the latent's size, so the output is f times larger
(f = the first stage's factor, 4 for the released model). Writes ``OUTDIR/samples/NNNNN.png`` and a grid.

    python scripts/superres.py --input lr.png --config bsr_sr.yaml --ckpt bsr_sr.ckpt --steps 100
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.inference import (  # noqa: E402
    add_sampling_arguments, autocast, downsampling_factor, ema_weights, get_device, load_image, load_model,
    run_script, sample_latents, save_grid, save_samples, seed_everything, to_uint8,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="the low-resolution image")
    add_sampling_arguments(parser, outdir="outputs/superres", config="models/ldm/bsr_sr/config.yaml",
                           ckpt="models/ldm/bsr_sr/model.ckpt", steps=100, n_samples=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    lr = load_image(opt.input)
    device = get_device(opt.device)
    model = load_model(opt.config, opt.ckpt, device)
    if model.model.conditioning_key != "concat":
        raise ValueError(f"{opt.config} is not a super-resolution model (conditioning_key is "
                         f"'{model.model.conditioning_key}', not 'concat')")
    f = downsampling_factor(model)
    seed_everything(opt.seed)
    h, w = lr.shape[-2:]
    images = []
    with torch.no_grad(), autocast(device, opt.precision), ema_weights(model):
        c = model.get_learned_conditioning(lr.to(device).repeat(opt.n_samples, 1, 1, 1))
        for _ in range(opt.n_iter):
            z = sample_latents(model, opt.sampler, (opt.n_samples, model.channels, h, w), c, None, 1.0,
                               opt.ddim_steps, opt.ddim_eta, sigma_schedule=opt.sigma_schedule)
            batch = to_uint8(model.decode_first_stage(z))
            save_samples(batch, opt.outdir)
            images.append(batch)
    grid = save_grid(np.concatenate(images), opt.outdir, opt.n_rows or opt.n_samples)
    print(f"{w}x{h} -> {w * f}x{h * f}: samples in {Path(opt.outdir) / 'samples'}, grid {grid}")


if __name__ == "__main__":
    run_script(main)
