"""Unconditional and class-conditional sampling from a latent diffusion checkpoint.

Writes ``OUTDIR/samples/NNNNN.png``, ``OUTDIR/grid-NNNN.png`` and, with ``--npz``, ``OUTDIR/samples.npz``
(``arr_0``: [N x H x W x 3] uint8, the format FID tools read; ``arr_1``: the labels of class-conditional or
classifier-guided runs).

    python scripts/sample_diffusion.py --config cin.yaml --ckpt cin.ckpt --classes 88 979 --scale 3 --npz

With ``--classifier CKPT`` (a noisy-latent classifier trained by ``main.py`` with ``configs/classifier/``) the
samples are also guided by its gradient towards their classes (``--classifier_scale``); an unconditional model
takes its ``--classes`` from the classifier then.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ldm.inference import (
    add_classifier_arguments, add_sampling_arguments, class_conditioning, decode_to_uint8, ema_weights, get_device,
    is_class_conditional, load_model, model_files, null_class, run_script, sampling_options, save_grid,
    save_samples, seed_everything,
)
from ldm.models.diffusion.classifier import load_classifier_for
from ldm.models.diffusion.guidance import CFGGuider, ClassifierGuidance, Guider
from ldm.models.diffusion.sampling import sample


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_total", type=int, default=None,
                        help="number of images (default: n_samples x n_iter per class, or n_samples x n_iter)")
    parser.add_argument("--classes", type=int, nargs="*", default=None,
                        help="class labels of a class-conditional model (default: random classes)")
    parser.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: NHWC uint8)")
    add_sampling_arguments(parser, outdir="outputs/sample-diffusion", config=None, ckpt=None, scale=1.0)
    add_classifier_arguments(parser)
    return parser.parse_args(argv)


def labels_for(model, opt: argparse.Namespace, n: int, classifier_classes: int | None = None) -> torch.Tensor | None:
    """The labels of the run: each of ``--classes`` n times, or n random non-null classes (None if unconditional
    and not classifier-guided; an unconditional model guided by a classifier of `classifier_classes` classes takes
    its labels from that classifier's classes)."""
    if is_class_conditional(model):
        n_classes, null, source = model.cond_stage_model.n_classes, null_class(model), "the model"
    elif classifier_classes is not None:
        n_classes, null, source = classifier_classes, None, f"the classifier {opt.classifier}"
    else:
        if opt.classes:
            raise ValueError("--classes given but the model is not class-conditional (and no --classifier)")
        return None
    if opt.classes:
        bad = [c for c in opt.classes if not 0 <= c < n_classes or c == null]
        if bad:
            raise ValueError(f"--classes {bad} are out of range [0, {n_classes}) of {source}"
                             + (f" or the null class {null}" if null is not None else ""))
        return torch.tensor(opt.classes).repeat_interleave(n)
    choices = torch.tensor([c for c in range(n_classes) if c != null])
    return choices[torch.randint(len(choices), (n,))]


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    classifier = None
    if opt.classifier is not None:
        classifier, info = load_classifier_for(opt.classifier, model, device)
    seed_everything(opt.seed)
    labels = labels_for(model, opt, opt.n_total or opt.n_samples * opt.n_iter,
                        None if classifier is None else info.num_classes)
    total = len(labels) if labels is not None else (opt.n_total or opt.n_samples * opt.n_iter)
    options = sampling_options(opt)
    images = []
    with torch.no_grad(), ema_weights(model):
        for start in range(0, total, opt.n_samples):
            n = min(opt.n_samples, total - start)
            c = uc = None
            if labels is not None and is_class_conditional(model):
                c, uc = class_conditioning(model, labels[start:start + n], opt.scale)
            guider: Guider = CFGGuider(opt.scale, uc)
            if classifier is not None:
                guider = ClassifierGuidance(classifier, labels[start:start + n], opt.classifier_scale, inner=guider)
            z = sample(model, model.latent_shape(n), c, guider=guider, options=options).samples
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
