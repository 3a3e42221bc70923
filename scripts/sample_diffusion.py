"""Unconditional and class-conditional sampling from a latent diffusion checkpoint.

Writes ``OUTDIR/samples/NNNNN.png``, ``OUTDIR/grid-NNNN.png`` and, with ``--npz``, ``OUTDIR/samples.npz``
(``arr_0``: [N x H x W x 3] uint8, the format FID tools read; ``arr_1``: the labels of class-conditional runs).

    python scripts/sample_diffusion.py --config cin.yaml --ckpt cin.ckpt --classes 88 979 --scale 3 --npz
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.inference import (
    add_sampling_arguments, class_conditioning, decode_to_uint8, ema_weights, get_device, is_class_conditional,
    load_model, null_class, run_script, sampling_options, save_grid, save_samples, seed_everything,
    model_files,
)
from ldm.models.diffusion.sampling import sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_total", type=int, default=None,
                        help="number of images (default: n_samples x n_iter per class, or n_samples x n_iter)")
    parser.add_argument("--classes", type=int, nargs="*", default=None,
                        help="class labels of a class-conditional model (default: random classes)")
    parser.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: NHWC uint8)")
    add_sampling_arguments(parser, outdir="outputs/sample-diffusion", config=None, ckpt=None, scale=1.0)
    return parser.parse_args(argv)


def labels_for(model, opt: argparse.Namespace, n: int) -> torch.Tensor | None:
    """The labels of the run: each of ``--classes`` n times, or n random non-null classes (None if unconditional)."""
    if not is_class_conditional(model):
        if opt.classes:
            raise ValueError("--classes given but the model is not class-conditional")
        return None
    null = null_class(model)
    if opt.classes:
        bad = [c for c in opt.classes if not 0 <= c < model.cond_stage_model.n_classes or c == null]
        if bad:
            raise ValueError(f"--classes {bad} are out of range [0, {model.cond_stage_model.n_classes}) or the "
                             f"null class {null}")
        return torch.tensor(opt.classes).repeat_interleave(n)
    choices = torch.tensor([c for c in range(model.cond_stage_model.n_classes) if c != null])
    return choices[torch.randint(len(choices), (n,))]


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    seed_everything(opt.seed)
    labels = labels_for(model, opt, opt.n_total or opt.n_samples * opt.n_iter)
    total = len(labels) if labels is not None else (opt.n_total or opt.n_samples * opt.n_iter)
    options = sampling_options(opt)
    images = []
    with torch.no_grad(), ema_weights(model):
        for start in range(0, total, opt.n_samples):
            n = min(opt.n_samples, total - start)
            c = uc = None
            if labels is not None:
                c, uc = class_conditioning(model, labels[start:start + n], opt.scale)
            z = sample(model, model.latent_shape(n), c, uncond=uc, scale=opt.scale, options=options).samples
            batch = decode_to_uint8(model, z, opt.precision)
            save_samples(batch, opt.outdir)
            images.append(batch)
    images = np.concatenate(images)
    grid = save_grid(images, opt.outdir, opt.n_rows or opt.n_samples)
    if opt.npz:
        arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels.numpy()}
        np.savez(Path(opt.outdir) / "samples.npz", **arrays)
    print(f"{len(images)} samples in {Path(opt.outdir) / 'samples'}, grid {grid}")


if __name__ == "__main__":
    run_script(main)
