"""Image-to-image: noise an image's latent part way (``--strength``) and denoise it with DDIM and guidance.

Writes ``OUTDIR/samples/NNNNN.png`` and ``OUTDIR/grid-NNNN.png``. The image is cropped to a multiple of
8 f pixels (f = the first stage's factor).

    python scripts/img2img.py --init-img in.png --prompt "a watercolour" --strength 0.6 --config c.yaml --ckpt m.ckpt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.inference import (
    add_lora_arguments, add_sampling_arguments, apply_finetuned_weights, class_conditioning, decode_to_uint8,
    downsampling_factor, ema_weights, get_device, is_class_conditional, load_image, load_model, model_files,
    run_script, save_grid, save_samples, seed_everything, text_conditioning,
)
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import autocast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-img", dest="init_img", required=True, help="the starting image")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much of the schedule to re-noise: 0 keeps the image, 1 samples afresh")
    parser.add_argument("--prompt", default="", help="the prompt of a text-conditional model")
    parser.add_argument("--negative_prompt", default="")
    parser.add_argument("--class_label", type=int, default=None, help="the class of a class-conditional model")
    add_sampling_arguments(parser, outdir="outputs/img2img-samples", config=None, ckpt=None, scale=5.0)
    add_lora_arguments(parser)
    return parser.parse_args(argv)


def conditioning(model, opt: argparse.Namespace):
    """(c, uc) for the model's kind of conditioning (None, None for unconditional models)."""
    if model.cond_stage_model is None:
        return None, None
    if is_class_conditional(model):
        if opt.class_label is None:
            raise ValueError("the model is class-conditional: give --class_label")
        return class_conditioning(model, torch.full((opt.n_samples,), opt.class_label), opt.scale)
    return text_conditioning(model, [opt.prompt] * opt.n_samples, opt.negative_prompt, opt.scale)


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    if not 0.0 < opt.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {opt.strength}")
    image = load_image(opt.init_img)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    apply_finetuned_weights(model, opt)
    multiple = 8 * downsampling_factor(model)
    h, w = (s - s % multiple for s in image.shape[-2:])
    if h == 0 or w == 0:
        raise ValueError(f"image {opt.init_img} is smaller than {multiple} pixels")
    image = image[..., :h, :w].to(device)
    seed_everything(opt.seed)
    sampler = DDIMSampler(model, precision=opt.precision)
    sampler.make_schedule(opt.ddim_steps, ddim_eta=opt.ddim_eta, verbose=False)
    t_enc = max(1, int(opt.strength * len(sampler.ddim_timesteps)))
    images = []
    with torch.no_grad(), ema_weights(model):
        with autocast(device, opt.precision):
            init = model.get_first_stage_encoding(model.encode_first_stage(image)).repeat(opt.n_samples, 1, 1, 1)
        c, uc = conditioning(model, opt)
        for _ in range(opt.n_iter):
            z = sampler.stochastic_encode(init, torch.full((opt.n_samples,), t_enc - 1, device=device))
            z = sampler.decode(z, c, t_enc, unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                               verbose=False)
            batch = decode_to_uint8(model, z, opt.precision)
            save_samples(batch, opt.outdir)
            images.append(batch)
    grid = save_grid(np.concatenate(images), opt.outdir, opt.n_rows or opt.n_samples)
    print(f"{t_enc} of {len(sampler.ddim_timesteps)} steps: samples in {Path(opt.outdir) / 'samples'}, grid {grid}")


if __name__ == "__main__":
    run_script(main)
