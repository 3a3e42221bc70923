"""Super-resolution with a latent diffusion model conditioned on the low-resolution image (as bsr_sr).

The LR image, in [-1, 1], is concatenated to the latent at the latent's size, so the output is f times larger
(f = the first stage's factor, 4 for the released model). Writes ``OUTDIR/samples/NNNNN.png`` and a grid.

    python scripts/superres.py --input lr.png --config bsr_sr.yaml --ckpt bsr_sr.ckpt --steps 100
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.inference import (
    add_sampling_arguments, add_tile_argument, configure_tiling, decode_to_uint8, downsampling_factor,
    ema_weights, get_device, load_image, load_model, model_files, run_script, sampling_options, save_grid,
    save_samples, seed_everything,
)
from ldm.models.diffusion.sampling import sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="the low-resolution image")
    add_sampling_arguments(parser, outdir="outputs/superres", config="models/ldm/bsr_sr/config.yaml",
                           ckpt="models/ldm/bsr_sr/model.ckpt", steps=100, n_samples=1)
    add_tile_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    lr = load_image(opt.input)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    if model.model.conditioning_key != "concat":
        raise ValueError(f"{opt.config} is not a super-resolution model (conditioning_key is "
                         f"'{model.model.conditioning_key}', not 'concat')")
    f = downsampling_factor(model)
    seed_everything(opt.seed)
    h, w = lr.shape[-2:]
    configure_tiling(model, opt.tile, (h, w), f)
    options = sampling_options(opt)
    images = []
    with torch.no_grad(), ema_weights(model):
        c = model.get_learned_conditioning(lr.to(device).repeat(opt.n_samples, 1, 1, 1))
        for _ in range(opt.n_iter):
            z = sample(model, (opt.n_samples, model.channels, h, w), c, options=options).samples
            batch = decode_to_uint8(model, z, opt.precision)
            save_samples(batch, opt.outdir)
            images.append(batch)
    grid = save_grid(np.concatenate(images), opt.outdir, opt.n_rows or opt.n_samples)
    print(f"{w}x{h} -> {w * f}x{h * f}: samples in {Path(opt.outdir) / 'samples'}, grid {grid}")


if __name__ == "__main__":
    run_script(main)
