"""Layout-to-image sampling: pictures that follow bounding-box layouts, from a layout model (``coordinates_bbox``
conditioning, e.g. ``configs/ldm/layout2img-coco-f4.yaml``).

The layouts are a COCO-style JSON file (see ``ldm/data/layout_json.py``) whose boxes are fractions of the image
in [0, 1]; classes are named by ``category`` (a class name of the model) or by ``category_id`` with
``categories``. One picture per image entry and sample::

    {"images": [{"id": 1}],
     "annotations": [{"image_id": 1, "category": "grinning face", "bbox": [0.1, 0.1, 0.4, 0.4]},
                     {"image_id": 1, "category": "smiling face with sunglasses", "bbox": [0.55, 0.5, 0.35, 0.35]}]}

    python scripts/layout2img.py --layout layout.json --config layout.yaml --ckpt model.ckpt --class_names names.txt

Writes ``OUTDIR/samples/NNNNN.png``, ``OUTDIR/layouts/samples/NNNNN.png`` (the layout drawn over the sample), a grid
of layouts beside their samples and ``OUTDIR/layouts/grid-NNNN.png`` (the layouts over the samples, enlarged). A box outside [0, 1] or an unknown class name is an error naming the file and
the entry.

How well a model on white-ground pictures (the emoji layout set of ``ldm.data.emoji_layout``) follows layouts:
sample the layouts of its validation set (a COCO instance file, boxes in pixels) and compare the foreground with
the own layouts and with other pictures' layouts (``--agreement`` prints both and writes
``OUTDIR/agreement.json``)::

    python scripts/layout2img.py --run logs/<run> --layout data/emoji_layout/val/instances.json --pixel_boxes \
        --max_layouts 32 --n_samples 32 --scale 3 --steps 25 --seed 0 --agreement
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ldm.data.emoji_layout import own_and_other_agreement
from ldm.data.layout import LayoutTokenizer
from ldm.data.layout_json import encode_layout_file, read_class_names
from ldm.inference import (
    add_sampling_arguments, decode_to_uint8, ema_weights, get_device, load_model, model_files, run_script,
    sampling_options, save_grid, save_samples, seed_everything, to_uint8,
)
from ldm.models.diffusion.image_logging import layout_images
from ldm.models.diffusion.sampling import sample

OVERLAY_SIDE = 128  # the overlay grid draws layouts on samples enlarged to at least this side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, help="COCO-style JSON with boxes as fractions in [0, 1] (pixels with --pixel_boxes)")
    parser.add_argument("--class_names", default=None,
                        help="the model's classes, one per line (default: the model's layout_tokenizer.class_names)")
    parser.add_argument("--pixel_boxes", action="store_true",
                        help="the file's boxes are pixels of each image's width and height (a COCO instance file)")
    parser.add_argument("--max_layouts", type=int, default=None, help="sample only the first N layouts of the file")
    parser.add_argument("--agreement", action="store_true",
                        help="measure how well the samples follow their layouts (pictures on a white ground): "
                             "foreground-box IoU with the own layouts against other pictures' layouts")
    add_sampling_arguments(parser, outdir="outputs/layout2img", config=None, ckpt=None, scale=1.0)
    return parser.parse_args(argv)


def layout_classes(model, opt: argparse.Namespace) -> tuple[LayoutTokenizer, list[str]]:
    """The model's tokenizer and class names (``layout_tokenizer`` of its config), or a tokenizer of the same
    sequences for the ``--class_names`` of a model that does not name its classes."""
    tokenizer, names = model.layout_tokenizer, model.layout_class_names
    given = read_class_names(opt.class_names)
    if given is None:
        if names is None:
            raise ValueError(f"the model of {opt.config} does not name its classes: give --class_names (a text "
                             f"file, one class per line, in the order of the training data's categories)")
        return tokenizer, list(names)
    if names is not None and len(given) != len(names):
        raise ValueError(f"--class_names {opt.class_names} has {len(given)} classes, the model {len(names)}")
    if names is None:  # a tokenizer read from the conditioner: same sequences, the given classes
        tokenizer = LayoutTokenizer(len(given), tokenizer.vocab_size, tokenizer.max_objects, tokenizer.encode_crop,
                                    use_group_flag=False)
    return tokenizer, given


def main(argv: list[str] | None = None) -> None:
    opt = parse_args(argv)
    device = get_device(opt.device)
    model = load_model(*model_files(opt), device)
    if getattr(model, "layout_tokenizer", None) is None:
        raise ValueError(f"{opt.config} is not a layout model (cond_stage_key is "
                         f"'{getattr(model, 'cond_stage_key', None)}', not 'coordinates_bbox')")
    if opt.max_layouts is not None and opt.max_layouts < 1:
        raise ValueError(f"--max_layouts must be at least 1, got {opt.max_layouts}")
    tokenizer, names = layout_classes(model, opt)
    tokens, image_ids = encode_layout_file(opt.layout, tokenizer, names, normalized=not opt.pixel_boxes)
    tokens, image_ids = tokens[:opt.max_layouts], image_ids[:opt.max_layouts]
    seed_everything(opt.seed)
    options = sampling_options(opt)
    h, w = model.latent_shape(1)[2:]
    images, drawn = [], []
    with torch.no_grad(), ema_weights(model):
        for _ in range(opt.n_iter):
            for start in range(0, len(tokens), opt.n_samples):
                batch = tokens[start:start + opt.n_samples].to(device)
                c = model.get_learned_conditioning(batch)
                uc = model.get_unconditional_conditioning(len(batch)) if opt.scale != 1.0 else None
                z = sample(model, model.latent_shape(len(batch)), c, uncond=uc, scale=opt.scale,
                           options=options).samples
                pictures = decode_to_uint8(model, z, opt.precision)
                overlay = layout_images(batch, tokenizer, pictures.shape[1:3], names,
                                        images=torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1)
                save_samples(pictures, opt.outdir)
                save_samples(to_uint8(overlay), Path(opt.outdir) / "layouts")
                images.append(pictures)
                drawn.append(to_uint8(layout_images(batch, tokenizer, pictures.shape[1:3], names)))
    pairs = np.stack([np.concatenate(drawn), np.concatenate(images)], axis=1).reshape(-1, *images[0].shape[1:])
    grid = save_grid(pairs, opt.outdir, 2 * min(4, len(pairs) // 2))
    over = overlay_grid(np.concatenate(images), tokens.repeat(opt.n_iter, 1), tokenizer, names, opt.outdir)
    print(f"{len(pairs) // 2} samples of {len(image_ids)} layouts ({h}x{w} latents) in "
          f"{Path(opt.outdir) / 'samples'}; layouts beside samples in {grid}, over them in {over}")
    if opt.agreement:
        report_agreement(np.concatenate(images), tokens.repeat(opt.n_iter, 1), tokenizer, opt)


def overlay_grid(pictures: np.ndarray, tokens: torch.Tensor, tokenizer: LayoutTokenizer, names: list[str],
                 outdir: str | Path) -> Path:
    """``OUTDIR/layouts/grid-NNNN.png``: the layouts drawn over their [N x H x W x 3] uint8 `pictures`, which are
    enlarged (nearest neighbour) to at least ``OVERLAY_SIDE`` pixels first so that the class names stay legible."""
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    factor = max(1, -(-OVERLAY_SIDE // min(pictures.shape[1:3])))
    images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    drawn = layout_images(tokens, tokenizer, images.shape[2:], names, images=images)
    return save_grid(to_uint8(drawn), Path(outdir) / "layouts", min(8, len(drawn)))


def report_agreement(pictures: np.ndarray, tokens: torch.Tensor, tokenizer: LayoutTokenizer,
                     opt: argparse.Namespace) -> None:
    """Prints and writes ``OUTDIR/agreement.json``: the mean foreground-box IoU of the [N x H x W x 3] uint8
    `pictures` with their own layouts (`tokens`, [N x seq_len]) and with other pictures' layouts."""
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    layouts = [layout.in_crop_frame() for layout in tokenizer.decode(tokens)]
    own, other = own_and_other_agreement(images, layouts, seed=opt.seed)
    result = {"own_iou": own, "other_iou": other, "samples": len(layouts), "layout_file": str(opt.layout),
              "config": str(opt.config), "ckpt": str(opt.ckpt), "scale": opt.scale, "steps": opt.ddim_steps,
              "sampler": str(opt.sampler), "seed": opt.seed}
    path = Path(opt.outdir) / "agreement.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"foreground-box IoU of {len(layouts)} samples: {own:.3f} with their own layouts, {other:.3f} with "
          f"other layouts ({path})")


if __name__ == "__main__":
    run_script(main)
