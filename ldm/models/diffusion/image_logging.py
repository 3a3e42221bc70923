"""Image helpers for the models' ``log_images`` (all images [N x C x H x W] in [-1, 1]; the rows are grids given
as [1 x C x H' x W']). Plain functions of tensors and callables; the models assemble the log.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

from ldm.data.layout import LayoutTokenizer
from ldm.data.layout_draw import draw_layouts
from ldm.models.diffusion.conditioning import is_text


def rows_grid(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """A grid with one row per example and one column per entry of `samples` (each [B x C x H x W]), as a
    batch of one image [1 x C x H' x W'] so that image loggers treat it like the other entries."""
    stacked = torch.stack(list(samples))  # n, b, c, h, w
    n = stacked.shape[0]
    return make_grid(stacked.transpose(0, 1).flatten(0, 1), nrow=n)[None]


def diffusion_row(q_sample: Callable[..., torch.Tensor], x_start: torch.Tensor, num_timesteps: int,
                  log_every_t: int) -> list[torch.Tensor]:
    """``q_sample`` of [n x C x H x W] `x_start` at every ``log_every_t``-th step and the last."""
    steps = [t for t in range(num_timesteps) if t % log_every_t == 0 or t == num_timesteps - 1]
    return [q_sample(x_start=x_start, t=torch.full((x_start.shape[0],), t, device=x_start.device, dtype=torch.long),
                     noise=torch.randn_like(x_start)) for t in steps]


def select(log: dict[str, torch.Tensor], return_keys: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Only the `return_keys` of `log` when any of them is present, else all of it (as the original)."""
    if return_keys and any(k in log for k in return_keys):
        return {k: log[k] for k in return_keys if k in log}
    return log


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of a [N x K x H x W] map (e.g. a segmentation) to RGB in [-1, 1]."""
    x = x.float()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, x.shape[1], 1, 1, generator=generator).to(x)
    x = torch.nn.functional.conv2d(x, weight)
    return 2.0 * (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8) - 1.0


def text_images(texts: Sequence[str], size: tuple[int, int], chars_per_line: int | None = None) -> torch.Tensor:
    """Captions drawn black on white with PIL's built-in font: an [N x 3 x H x W] Tensor in [-1, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    font = ImageFont.load_default()
    per_line = chars_per_line or max(1, w // 6)
    images = []
    for text in texts:
        canvas = Image.new("RGB", (w, h), "white")
        lines = [text[i:i + per_line] for i in range(0, len(text), per_line)] or [""]
        ImageDraw.Draw(canvas).multiline_text((0, 0), "\n".join(lines), fill="black", font=font)
        images.append(torch.from_numpy(np.asarray(canvas).copy()))
    return torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def conditioning_images(xc: Any, c: Any, size: tuple[int, int],
                        decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The conditioning as images: captions or class names as text, encoded images decoded by `decode` (the
    conditioner's decoder, given for conditioners that have one), images, or maps projected to RGB.

    :param xc: the raw conditioning; :param c: the encoded one (for `decode`).
    """
    n = c.shape[0] if isinstance(c, torch.Tensor) else None
    if is_text(xc):
        return {"conditioning": text_images(list(xc)[:n], size)}
    if isinstance(xc, Mapping) and "human_label" in xc:
        return {"conditioning": text_images([str(s) for s in xc["human_label"]][:n], size)}
    if decode is not None and isinstance(c, torch.Tensor):
        return {"conditioning": decode(c)}
    if isinstance(xc, torch.Tensor) and xc.ndim == 4:
        return {"conditioning": xc} if xc.shape[1] == 3 else {"original_conditioning": to_rgb(xc)}
    return {}


def layout_images(tokens: torch.Tensor, tokenizer: LayoutTokenizer, size: tuple[int, int],
                  class_names: Sequence[str] | None = None, images: torch.Tensor | None = None) -> torch.Tensor:
    """Layouts ([N x seq_len] ``coordinates_bbox`` tokens) drawn as boxes with class names: on white canvases of
    `size`, or on [N x 3 x H x W] `images`; an [N x 3 x H x W] Tensor in [-1, 1] on the device of `images`."""
    layouts = tokenizer.decode(torch.as_tensor(tokens).cpu())
    drawn = draw_layouts(layouts, None if images is None else images.cpu(), size, class_names)
    return drawn if images is None else drawn.to(images)


def inpainting_masks(n: int, h: int, w: int, device: torch.device) -> dict[str, torch.Tensor]:
    """[n x 1 x h x w] masks that keep the border and fill the centre square (``samples_inpainting``), and the
    reverse (``samples_outpainting``); 1 marks what is kept."""
    mask = torch.ones(n, 1, h, w, device=device)
    mask[:, :, h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.0
    return {"samples_inpainting": mask, "samples_outpainting": 1.0 - mask}


def intermediates_grid(latents: Any, decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A grid of decoded intermediate latents (a list, or the DDIM sampler's dict of lists)."""
    if isinstance(latents, Mapping):
        latents = latents.get("pred_x0") or latents.get("x_inter")
    return rows_grid([decode(z) for z in latents])
