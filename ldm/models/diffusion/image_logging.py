"""Images that DDPM/LatentDiffusion ``log_images`` return for the image logger (all [N x C x H x W] in [-1, 1];
the rows are grids given as [1 x C x H' x W']).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

from ldm.models.diffusion import ancestral

logger = logging.getLogger(__name__)


def rows_grid(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """A grid with one row per example and one column per entry of `samples` (each [B x C x H x W]), as a
    batch of one image [1 x C x H' x W'] so that image loggers treat it like the other entries."""
    stacked = torch.stack(list(samples))  # n, b, c, h, w
    n = stacked.shape[0]
    return make_grid(stacked.transpose(0, 1).flatten(0, 1), nrow=n)[None]


def diffusion_steps(model: Any) -> list[int]:
    """The steps shown in a diffusion row: every ``log_every_t`` and the last."""
    return [t for t in range(model.num_timesteps) if t % model.log_every_t == 0 or t == model.num_timesteps - 1]


def diffusion_row(model: Any, x_start: torch.Tensor) -> list[torch.Tensor]:
    """``q_sample`` of [n x C x H x W] `x_start` at each step of :func:`diffusion_steps`."""
    row = []
    for t in diffusion_steps(model):
        ts = torch.full((x_start.shape[0],), t, device=x_start.device, dtype=torch.long)
        row.append(model.q_sample(x_start=x_start, t=ts, noise=torch.randn_like(x_start)))
    return row


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


@torch.no_grad()
def log_images_ddpm(model: Any, batch: Mapping[str, Any], N: int, n_row: int, sample: bool,
                    return_keys: Sequence[str] | None) -> dict[str, torch.Tensor]:
    x = model.get_input(batch, model.first_stage_key).to(model.device)
    N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
    x = x[:N]
    log = {"inputs": x, "diffusion_row": rows_grid(diffusion_row(model, x[:n_row]))}
    if sample:
        with model.ema_scope("Plotting"):
            samples, denoise_row = model.sample(batch_size=N, return_intermediates=True)
        log["samples"] = samples
        log["denoise_row"] = rows_grid(denoise_row)
    return select(log, return_keys)


def sample_log(model: Any, cond: Any, batch_size: int, ddim: bool, ddim_steps: int | None, eta: float = 1.0,
               x0: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               quantize_denoised: bool = False) -> tuple[torch.Tensor, Any]:
    """Samples [batch_size x C x h x w] latents with the DDIM sampler (if `ddim` and it is available), else
    ancestrally; guidance is ``uc + scale * (c - uc)``, `mask` keeps `x0` where it is 1."""
    shape = (model.channels, model.image_size, model.image_size)
    if ddim:
        try:
            from ldm.models.diffusion.ddim import DDIMSampler
        except ImportError:
            logger.warning("DDIMSampler is not available; logging ancestral samples instead")
        else:
            return DDIMSampler(model).sample(S=ddim_steps, batch_size=batch_size, shape=shape, conditioning=cond,
                                             eta=eta, x0=x0, mask=mask, verbose=False,
                                             quantize_x0=quantize_denoised,
                                             unconditional_guidance_scale=unconditional_guidance_scale,
                                             unconditional_conditioning=unconditional_conditioning)
    denoise = model.denoiser(cond)
    if unconditional_guidance_scale != 1.0 and unconditional_conditioning is not None:
        denoise = guided(denoise, model.denoiser(unconditional_conditioning), unconditional_guidance_scale)
    return ancestral.sample_loop(model, denoise, (batch_size, *shape), clip_denoised=model.clip_denoised,
                                 mask=mask, x0=x0, x0_fn=model.quantizer(quantize_denoised),
                                 log_every_t=model.log_every_t, verbose=False, device=model.device)


def guided(cond_fn: ancestral.Denoiser, uncond_fn: ancestral.Denoiser, scale: float) -> ancestral.Denoiser:
    """Classifier-free guidance of two denoisers: ``uc + scale * (c - uc)``."""
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uc = uncond_fn(x, t)
        return uc + scale * (cond_fn(x, t) - uc)
    return denoise


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


def conditioning_image(model: Any, c: Any, xc: Any, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The conditioning as images: captions or class names as text, decodable latents, images, or maps."""
    out: dict[str, torch.Tensor] = {}
    n = c.shape[0] if isinstance(c, torch.Tensor) else None
    if isinstance(xc, (list, tuple)) and all(isinstance(s, str) for s in xc):
        out["conditioning"] = text_images(list(xc)[:n], size)
    elif isinstance(xc, Mapping) and "human_label" in xc:
        out["conditioning"] = text_images([str(s) for s in xc["human_label"]][:n], size)
    elif hasattr(model.cond_stage_model, "decode") and isinstance(c, torch.Tensor):
        out["conditioning"] = model.cond_stage_model.decode(c[:, :-1] if model.concat_mask_key else c)
    elif isinstance(xc, torch.Tensor) and xc.ndim == 4:
        if xc.shape[1] == 3:
            out["conditioning"] = xc
        else:
            out["original_conditioning"] = to_rgb(xc)
    return out


@torch.no_grad()
def log_images_ldm(model: Any, batch: Mapping[str, Any], N: int, n_row: int, sample: bool,
                   ddim_steps: int | None, ddim_eta: float, return_keys: Sequence[str] | None,
                   quantize_denoised: bool, inpaint: bool, plot_denoise_rows: bool, plot_progressive_rows: bool,
                   plot_diffusion_rows: bool, guidance_scale: float) -> dict[str, torch.Tensor]:
    use_ddim = ddim_steps is not None
    z, c, x, xrec, xc = model.get_input(batch, model.first_stage_key, return_first_stage_outputs=True,
                                        force_c_encode=True, return_original_cond=True, bs=N)
    N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
    log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
    if model.model.conditioning_key is not None:
        log.update(conditioning_image(model, c, xc, (x.shape[2], x.shape[3])))
    if plot_diffusion_rows:
        log["diffusion_row"] = rows_grid([model.decode_first_stage(zt) for zt in diffusion_row(model, z[:n_row])])
    if sample:
        with model.ema_scope("Plotting"):
            samples, z_denoise_row = sample_log(model, c, N, use_ddim, ddim_steps, eta=ddim_eta)
        log["samples"] = model.decode_first_stage(samples)
        if plot_denoise_rows:
            log["denoise_row"] = denoise_grid(model, z_denoise_row)
        if guidance_scale != 1.0 and model.model.conditioning_key is not None:
            uc = model.get_unconditional_conditioning(N, like=xc)
            with model.ema_scope("Plotting guided"):
                samples, _ = sample_log(model, c, N, use_ddim, ddim_steps, eta=ddim_eta,
                                        unconditional_guidance_scale=guidance_scale, unconditional_conditioning=uc)
            log[f"samples_cfg_scale_{guidance_scale:.2f}"] = model.decode_first_stage(samples)
        quantizes = callable(getattr(model.first_stage_model, "quantize", None))
        if quantize_denoised and quantizes:
            with model.ema_scope("Plotting Quantized Denoised"):
                samples, _ = sample_log(model, c, N, use_ddim, ddim_steps, eta=ddim_eta, quantize_denoised=True)
            log["samples_x0_quantized"] = model.decode_first_stage(samples)
        if inpaint:
            log.update(inpainting(model, z, c, N, use_ddim, ddim_steps, ddim_eta))
    if plot_progressive_rows:
        with model.ema_scope("Plotting Progressives"):
            _, progressives = model.progressive_denoising(
                c, shape=(model.channels, model.image_size, model.image_size), batch_size=N, verbose=False)
        log["progressive_row"] = denoise_grid(model, progressives)
    return select(log, return_keys)


def denoise_grid(model: Any, latents: Any) -> torch.Tensor:
    """A grid of decoded intermediate latents (a list, or the DDIM sampler's dict of lists)."""
    if isinstance(latents, Mapping):
        latents = latents.get("pred_x0") or latents.get("x_inter")
    return rows_grid([model.decode_first_stage(zd.to(model.device)) for zd in latents])


def inpainting(model: Any, z: torch.Tensor, c: Any, N: int, use_ddim: bool, ddim_steps: int | None,
               ddim_eta: float) -> dict[str, torch.Tensor]:
    """Samples that keep the border of `z` and fill a centre square (and keep the centre, fill the border)."""
    h, w = z.shape[2], z.shape[3]
    mask = torch.ones(N, 1, h, w, device=z.device)
    mask[:, :, h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.0
    out = {"mask": mask}
    for name, m in (("samples_inpainting", mask), ("samples_outpainting", 1.0 - mask)):
        with model.ema_scope(f"Plotting {name}"):
            samples, _ = sample_log(model, c, N, use_ddim, ddim_steps, eta=ddim_eta, x0=z[:N], mask=m)
        out[name] = model.decode_first_stage(samples.to(model.device))
    return out
