"""Inpainting with a latent diffusion model conditioned on the masked image and the mask (as the original).

``--indir`` holds pairs ``NAME.png`` + ``NAME_mask.png`` (white = fill in). For each pair the model samples
from ``c = cat(E(masked image), mask)``, built exactly as the original script did (the masked pixels are black,
-1, as the released inpainting model was trained); the result keeps the known pixels and is written to
``OUTDIR/NAME.png``.

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results --steps 50
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.inference import (
    add_lora_arguments, add_sampling_arguments, apply_finetuned_weights, downsampling_factor, ema_weights, get_device,
    load_image, load_model, model_files, run_script, sampling_options, seed_everything, to_uint8,
)
from ldm.models.diffusion.conditioning import mask_channel
from ldm.models.diffusion.sampling import autocast, sample

MASK_SUFFIX = "_mask"


def find_pairs(indir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a folder; an image without its mask raises FileNotFoundError naming the mask."""
    indir = Path(indir)
    if not indir.is_dir():
        raise FileNotFoundError(f"input folder not found: {indir}")
    images = sorted(p for p in indir.glob("*.png") if not p.stem.endswith(MASK_SUFFIX))
    if not images:
        raise FileNotFoundError(f"no NAME.png images in {indir} (with NAME{MASK_SUFFIX}.png masks)")
    pairs = []
    for image in images:
        mask = image.with_name(image.stem + MASK_SUFFIX + ".png")
        if not mask.is_file():
            raise FileNotFoundError(f"image {image} has no mask {mask}")
        pairs.append((image, mask))
    return pairs


def load_mask(path: Path, size: tuple[int, int], image: Path) -> torch.Tensor:
    """A mask file as a [1 x 1 x H x W] Tensor in {0, 1} (1 = fill in); its size must match the image's."""
    with Image.open(path) as m:
        if m.size != size:
            raise ValueError(f"mask {path} is {m.size[0]}x{m.size[1]} but image {image} is {size[0]}x{size[1]}")
        mask = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--indir", required=True, help="folder of NAME.png + NAME_mask.png pairs")
    add_sampling_arguments(parser, outdir="outputs/inpainting_results", config="models/ldm/inpainting_big/config.yaml",
                           ckpt="models/ldm/inpainting_big/last.ckpt", n_samples=1)
    add_lora_arguments(parser)
    return parser.parse_args(argv)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original script's masked image: ``((1 - mask) * image01) * 2 - 1`` with image01 the image in [0, 1],
    i.e. the pixels to fill are black (-1) in [-1, 1]. `image` [N x 3 x H x W] in [-1, 1], `mask` [N x 1 x H x W]
    in {0, 1} (1 = fill in)."""
    return ((1 - mask) * (image + 1) / 2) * 2 - 1


@torch.no_grad()
def inpainting_conditioning(model, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``c = cat(E(masked image), mask)`` as the original script builds it: the first stage's encoding of
    :func:`masked_image` and the mask mapped to {-1, 1}, resized (nearest) to the latent size."""
    c = model.get_learned_conditioning(masked_image(image, mask))
    return torch.cat([c, mask_channel(mask, c.shape[-2:])], dim=1)


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask: torch.Tensor, opt: argparse.Namespace) -> torch.Tensor:
    """The inpainted [1 x 3 x H x W] image in [-1, 1]: sampled inside the mask, `image` outside."""
    with autocast(image.device, opt.precision):
        c = inpainting_conditioning(model, image, mask)
    z = sample(model, (1, c.shape[1] - 1, *c.shape[-2:]), c, options=sampling_options(opt)).samples
    with autocast(image.device, opt.precision):
        predicted = model.decode_first_stage(z).float().clamp(-1, 1)
    return (1 - mask) * image + mask * predicted


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    pairs = find_pairs(opt.indir)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    apply_finetuned_weights(model, opt)
    f = downsampling_factor(model)
    seed_everything(opt.seed)
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with ema_weights(model):
        for image_path, mask_path in pairs:
            image = load_image(image_path)
            h, w = image.shape[-2:]
            if h % f or w % f:
                raise ValueError(f"image {image_path} is {w}x{h}; its sides must be multiples of {f}")
            mask = load_mask(mask_path, (w, h), image_path)
            result = inpaint(model, image.to(device), mask.to(device), opt)
            Image.fromarray(to_uint8(result)[0]).save(outdir / image_path.name)
    print(f"{len(pairs)} inpainted images in {outdir}")


if __name__ == "__main__":
    run_script(main)
