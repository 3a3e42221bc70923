"""What every sampling script and notebook shares: load a model from a config and checkpoint, pick the device,
build the sampling options from the command line, condition on prompts or classes, and save numbered PNGs and a
grid. Sampling itself is :func:`ldm.models.diffusion.sampling.sample`, the one sampling path.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointError, load_state_dict
from ldm.data.base import UnusableImage, open_image, to_model_image
from ldm.models.autoencoder import allow_missing_checkpoints
from ldm.models.diffusion.guidance import Conditioning
from ldm.models.diffusion.sampling import (Precision, SamplerKind, SamplingOptions, SigmaSchedule, autocast,
                                          sample)
from ldm.runs import CheckpointChoice, resolve_run_folder
from ldm.util import ConfigError, config_source, instantiate_from_config

logger = logging.getLogger(__name__)


def get_device(name: str | None = None) -> torch.device:
    """`name` if given, else the first available of cuda, mps and cpu."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_config(*paths: str | Path) -> Any:
    """The OmegaConf merge of YAML files; a missing file raises FileNotFoundError naming it."""
    from omegaconf import OmegaConf

    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"config not found: {p}")
    return OmegaConf.merge(*[OmegaConf.load(p) for p in paths])


def load_model(config: str | Path, ckpt: str | Path | None, device: torch.device | str | None = None,
               strict: bool = False) -> torch.nn.Module:
    """Builds ``config.model`` and loads the weights of `ckpt` (safely: no code in the file runs).

    :param config: a YAML file with a ``model`` section (as the original's configs).
    :param ckpt: a Lightning ``.ckpt`` or a ``.safetensors`` file (None keeps the random initialisation). It holds
        the first stage's weights too, so a first-stage `ckpt_path` of the config need not exist then.
    :return: the model in eval mode on `device` (default: :func:`get_device`).
    :raises FileNotFoundError: naming the config or checkpoint path.
    :raises ConfigError: when the config has no ``model`` or the checkpoint does not fit it.
    """
    cfg = load_config(config)
    if "model" not in cfg:
        raise ConfigError(f"config {config} has no 'model' section")
    if ckpt is not None and not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    with config_source(config):
        model = instantiate_from_config(cfg.model if ckpt is None else allow_missing_checkpoints(cfg.model))
    if ckpt is not None:
        state_dict = load_state_dict(ckpt)
        missing, unexpected = model.load_state_dict(state_dict, strict=strict)
        if len(missing) == len(model.state_dict()):
            raise ConfigError(f"checkpoint {ckpt} has none of the weights of the model in {config}")
        if missing:
            logger.warning("%d keys missing from %s, e.g. %s", len(missing), ckpt, missing[:3])
        if unexpected:
            logger.warning("%d unexpected keys in %s, e.g. %s", len(unexpected), ckpt, unexpected[:3])
    return model.to(get_device() if device is None else torch.device(device)).eval()


def model_device(model: Any) -> torch.device:
    """The device of a model's schedule buffers (or of its parameters)."""
    for tensor in (*model.buffers(), *model.parameters()):
        return tensor.device
    raise ValueError(f"{type(model).__name__} has no buffers or parameters to take a device from")


@torch.no_grad()
def downsampling_factor(model: Any) -> int:
    """The first stage's spatial factor f (image size / latent size), measured by decoding a 4x4 latent."""
    device = model_device(model)
    z = torch.zeros(1, model.channels, 4, 4, device=device)
    return model.decode_first_stage(z).shape[-1] // 4


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N x 3 x H x W] images in [-1, 1] -> an [N x H x W x 3] uint8 array."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def decode_to_uint8(model: Any, z: torch.Tensor, precision: Precision | str = Precision.FULL) -> np.ndarray:
    """Decodes latents [N x C x h x w] (with autocast at `precision` on accelerators) to [N x H x W x 3] uint8."""
    with autocast(z.device, precision):
        return to_uint8(model.decode_first_stage(z))


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as a [1 x 3 x H x W] float Tensor in [-1, 1].

    Every mode is converted to RGB as the datasets do (EXIF orientation applied, transparency composited on
    white, high bit depth scaled), with a log line naming the file and its mode.

    :raises FileNotFoundError: naming `path` when it does not exist.
    :raises ValueError: naming `path` when it is not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as probe:
            mode = probe.mode
        image = open_image(path)
    except (OSError, UnusableImage) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if mode != "RGB":
        logger.warning("converted %s from %s to RGB", path, mode)
    x = torch.from_numpy(to_model_image(image))
    return x.permute(2, 0, 1)[None]


def _next_index(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern)))


def save_samples(images: np.ndarray, outdir: str | Path) -> list[Path]:
    """Writes [N x H x W x 3] uint8 images to ``outdir/samples/NNNNN.png``, numbering on from existing files."""
    folder = Path(outdir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    start = _next_index(folder, "[0-9]" * 5 + ".png")
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{start + i:05}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def make_grid(images: np.ndarray, n_rows: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles [N x H x W x 3] uint8 images into one [rows*(H+p)+p x cols*(W+p)+p x 3] image, `n_rows` per row."""
    n, h, w, c = images.shape
    cols = n_rows or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = image
    return grid


def save_grid(images: np.ndarray, outdir: str | Path, n_rows: int | None = None) -> Path:
    """Writes the grid of `images` to ``outdir/grid-NNNN.png``, numbering on from existing grids."""
    folder = Path(outdir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"grid-{_next_index(folder, 'grid-' + '[0-9]' * 4 + '.png'):04}.png"
    Image.fromarray(make_grid(images, n_rows)).save(path)
    return path


def labelled_grid(images: np.ndarray, labels: Sequence[str], per_row: int, zoom: int = 2) -> Image.Image:
    """One row per label: the label, then `per_row` images ([N x H x W x 3] uint8, label-major), zoomed."""
    if len(images) != len(labels) * per_row:
        raise ValueError(f"{len(images)} images for {len(labels)} labels of {per_row} each")
    h, w = images.shape[1:3]
    cell, pad = (w * zoom, h * zoom), 2
    font = ImageFont.load_default(size=14)
    text_w = 12 + int(max(font.getlength(label) for label in labels))
    grid = Image.new("RGB", (text_w + per_row * (cell[0] + pad), len(labels) * (cell[1] + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        y = r * (cell[1] + pad)
        draw.text((6, y + cell[1] // 2), label, fill="black", font=font, anchor="lm")
        for c in range(per_row):
            tile = Image.fromarray(images[r * per_row + c]).resize(cell, Image.Resampling.NEAREST)
            grid.paste(tile, (text_w + c * (cell[0] + pad), y))
    return grid


@contextlib.contextmanager
def ema_weights(model: Any) -> Iterator[None]:
    """The model's EMA weights while inside (a no-op for models without ``ema_scope``)."""
    scope = getattr(model, "ema_scope", None)
    with (scope("sampling") if callable(scope) else contextlib.nullcontext()):
        yield


def seed_everything(seed: int) -> None:
    """Seeds torch (all devices) and numpy."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


def add_sampling_arguments(parser: argparse.ArgumentParser, outdir: str, config: str | None, ckpt: str | None,
                           scale: float = 1.0, steps: int = 50, n_samples: int = 4) -> None:
    """The arguments every sampling script shares (model, device, sampler, guidance, seeds, outputs)."""
    add_run_arguments(parser, config, ckpt)
    parser.add_argument("--outdir", default=outdir, help="output folder")
    parser.add_argument("--sampler", default=SamplerKind.DDIM.value, choices=[k.value for k in SamplerKind])
    parser.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=steps,
                        help="number of sampling steps")
    parser.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=0.0,
                        help="DDIM eta (0: deterministic, 1: DDPM-like)")
    parser.add_argument("--sigma_schedule", default=SigmaSchedule.KARRAS.value,
                        choices=[k.value for k in SigmaSchedule], help="noise levels of the sigma-space samplers")
    parser.add_argument("--scale", type=float, default=scale,
                        help="classifier-free guidance scale: uc + scale * (c - uc); 1 disables guidance")
    parser.add_argument("--n_samples", type=int, default=n_samples, help="batch size")
    parser.add_argument("--n_iter", type=int, default=1, help="batches per prompt or class")
    parser.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--precision", default=Precision.AUTOCAST.value, choices=[p.value for p in Precision],
                        help="autocast (float16) or bf16 on accelerators, or full precision")
    parser.add_argument("--device", default=None, help="device (default: cuda, else mps, else cpu)")


def add_run_arguments(parser: argparse.ArgumentParser, config: str | None, ckpt: str | None) -> None:
    """The model's files: ``--run`` (a ``main.py`` run folder) or ``--config``/``--ckpt`` (the original's
    layout; `config`/`ckpt` are the script's defaults). :func:`model_files` resolves them after parsing."""
    parser.add_argument("--run", default=None,
                        help="a main.py run folder (<logdir>/<time>_<name>) or a checkpoint inside one: its merged "
                             "config and checkpoint, instead of --config/--ckpt")
    parser.add_argument("--run_checkpoint", default="last", choices=[c.value for c in CheckpointChoice],
                        help="with --run: the last checkpoint, or the best on the model's monitored metric")
    parser.add_argument("--config", default=None, help=f"model config (YAML){f'; default {config}' if config else ''}")
    parser.add_argument("--ckpt", default=None,
                        help=f"checkpoint (.ckpt or .safetensors){f'; default {ckpt}' if ckpt else ''}")
    parser.set_defaults(default_config=config, default_ckpt=ckpt)


def model_files(opt: argparse.Namespace) -> tuple[Path, Path]:
    """The config and checkpoint that the arguments of :func:`add_run_arguments` name, also written back to
    ``opt.config``/``opt.ckpt``.

    :raises ValueError: when ``--run`` comes with ``--config``/``--ckpt``, or neither names a config and checkpoint.
    :raises RunFolderError: when ``--run`` is not a run folder (the message says what is missing).
    """
    if opt.run is not None:
        if opt.config is not None or opt.ckpt is not None:
            raise ValueError("--run takes the config and checkpoint from the run folder; leave out --config/--ckpt")
        checkpoint = None if Path(opt.run).is_file() else opt.run_checkpoint
        run = resolve_run_folder(opt.run, checkpoint)
        opt.config, opt.ckpt = run.config, run.checkpoint
    else:
        opt.config = opt.config or getattr(opt, "default_config", None)
        opt.ckpt = opt.ckpt or getattr(opt, "default_ckpt", None)
        if opt.config is None or opt.ckpt is None:
            raise ValueError("name the model: --run <main.py run folder>, or both --config and --ckpt")
    return Path(opt.config), Path(opt.ckpt)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """``--lora FILE [--lora_scale S] [--first_stage CKPT]`` of the scripts that sample fine-tuned weights (see
    :func:`apply_finetuned_weights`)."""
    parser.add_argument("--lora", default=None, help="LoRA adapter file (.safetensors) to merge into the model")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="strength of the LoRA (0: none, 1: as trained)")
    parser.add_argument("--first_stage", default=None,
                        help="first-stage weights that replace the model's (a checkpoint of the first stage alone, "
                             "e.g. the adapted decoder that scripts/dreambooth.py writes beside a LoRA)")


def load_first_stage(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Loads a checkpoint of a first stage alone (``{"state_dict": first_stage.state_dict()}``) into
    ``model.first_stage_model``, strictly.

    :raises CheckpointError: naming the file when it does not fit the model's first stage.
    """
    state = load_state_dict(path)
    try:
        model.first_stage_model.load_state_dict(state)
    except RuntimeError as e:
        details = str(e).splitlines()[1:3]
        raise CheckpointError(f"{path} is not a first stage of this model: {' '.join(d.strip() for d in details)}"
                              ) from None
    return model


def apply_finetuned_weights(model: torch.nn.Module, opt: argparse.Namespace) -> torch.nn.Module:
    """Loads ``opt.first_stage`` (if given) into the model's first stage and merges ``opt.lora`` (if given) into the
    model and its EMA weights at ``opt.lora_scale``.

    :raises CheckpointError: naming the first-stage file when it does not fit.
    :raises LoraMismatchError: naming the LoRA file and the keys when it was made for another architecture.
    """
    if opt.first_stage is not None:
        load_first_stage(model, opt.first_stage)
    if opt.lora is None:
        return model
    from ldm.finetune.lora import load_lora_for_sampling

    return load_lora_for_sampling(model, opt.lora, scale=opt.lora_scale)


def sampling_options(opt: argparse.Namespace) -> SamplingOptions:
    """The :class:`SamplingOptions` of the arguments of :func:`add_sampling_arguments`."""
    return SamplingOptions(sampler=opt.sampler, steps=opt.ddim_steps, eta=opt.ddim_eta,
                           sigma_schedule=opt.sigma_schedule, precision=opt.precision)


def run_script(main: Callable[[], None]) -> None:
    """Runs a script's `main`, turning bad input (missing files, bad values) into a one-line error and exit 2."""
    try:
        main()
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


@torch.no_grad()
def text_conditioning(model: Any, prompts: Sequence[str], negative_prompt: str = "",
                      scale: float = 1.0) -> tuple[Conditioning, Conditioning]:
    """(c, uc) for a text model: the prompts' embeddings and, when guiding, the negative prompt's (by default
    the model's null condition, the empty prompt)."""
    c = model.get_learned_conditioning(list(prompts))
    if scale == 1.0:
        return c, None
    if negative_prompt:
        return c, model.get_learned_conditioning([negative_prompt] * len(prompts))
    return c, model.get_unconditional_conditioning(len(prompts))


@torch.no_grad()
def sample_prompts(model: Any, prompts: Sequence[str], per_prompt: int, *, steps: int = 25, scale: float = 3.0,
                   seed: int = 0, batch_size: int = 64, desc: str = "sampling") -> torch.Tensor:
    """`per_prompt` images of each prompt from a text model's EMA weights (DDIM, classifier-free guidance):
    [len(prompts) * per_prompt x 3 x H x W] in [-1, 1] on the CPU, prompt-major; the initial noise comes from a
    generator seeded with `seed`, batch after batch."""
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    wanted = [p for p in prompts for _ in range(per_prompt)]
    options = SamplingOptions(sampler="ddim", steps=steps, precision="autocast")
    images = []
    for i in tqdm(range(0, len(wanted), batch_size), desc=desc, unit="batch", leave=False):
        chunk = wanted[i:i + batch_size]
        shape = model.latent_shape(len(chunk))
        x_T = torch.randn(shape, generator=gen).to(device)
        with ema_weights(model):
            cond, uncond = text_conditioning(model, chunk, scale=scale)
            z = sample(model, shape, cond, uncond=uncond, scale=scale, options=options, x_T=x_T).samples
            images.append(model.decode_first_stage(z).float().clamp(-1, 1).cpu())
    return torch.cat(images)


def null_class(model: Any) -> int:
    """The null label of a class-conditional model (``ucg_null_label`` or ``n_classes - 1``, as the original)."""
    if model.null_label is None:
        raise ValueError(f"{type(model).__name__} has no null class (it is not class-conditional)")
    return int(model.null_label)


@torch.no_grad()
def class_conditioning(model: Any, labels: torch.Tensor, scale: float = 1.0) -> tuple[Conditioning, Conditioning]:
    """(c, uc) for a class-conditional model and [N] labels; uc is the null class when guiding."""
    labels = labels.to(model_device(model))
    c = model.get_learned_conditioning({model.conditions.label_key: labels})
    uc = model.get_unconditional_conditioning(len(labels)) if scale != 1.0 else None
    return c, uc


def is_class_conditional(model: Any) -> bool:
    return model.conditional and model.conditions.class_conditional


# -- patch-wise first stage (--tile) --------------------------------------------------------------------------
TILE_LATENT_SIZE = 128  # --tile auto tiles latents larger than this, by tiles of this size every half of it


def add_tile_argument(parser: argparse.ArgumentParser) -> None:
    """``--tile auto|on|off``: decode (and encode) by overlapping tiles (the ``split_input_params`` mechanism)."""
    parser.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                        help=f"patch-wise first-stage decoding by tiles of {TILE_LATENT_SIZE} latent pixels every "
                             f"{TILE_LATENT_SIZE // 2} (bounded memory for large images); auto: when the latent is "
                             f"larger than {TILE_LATENT_SIZE} pixels")


def configure_tiling(model: Any, mode: str, latent_size: Sequence[int], factor: int) -> bool:
    """Sets ``model.split_input_params`` for `mode` (``--tile``) and an [h, w] latent; returns whether it tiles.

    ``off`` removes any tiling (also one from the config); ``auto`` and ``on`` keep a config's own
    ``split_input_params`` and otherwise tile by ``TILE_LATENT_SIZE`` latent pixels with half a tile of overlap
    (``auto`` only when the latent is larger than that).
    """
    if mode == "off":
        model.split_input_params = None
        return False
    if model.split_input_params is not None:
        return True
    if mode == "auto" and max(latent_size) <= TILE_LATENT_SIZE:
        return False
    model.split_input_params = {"ks": TILE_LATENT_SIZE, "stride": TILE_LATENT_SIZE // 2, "vqf": factor}
    logger.info("decoding %dx%d latents by tiles of %d every %d (--tile %s)", *latent_size, TILE_LATENT_SIZE,
                TILE_LATENT_SIZE // 2, mode)
    return True


# -- classifier guidance (--classifier) -----------------------------------------------------------------------
def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    """``--classifier CKPT --classifier_scale S``: guidance by a noisy-latent classifier (trained with main.py and
    ``configs/classifier/``), on top of classifier-free guidance."""
    parser.add_argument("--classifier", default=None,
                        help="a NoisyLatentImageClassifier checkpoint: guide samples towards their classes")
    parser.add_argument("--classifier_scale", type=float, default=1.0,
                        help="classifier guidance scale s: eps <- eps - sigma_t * s * grad log p(y | z_t)")
