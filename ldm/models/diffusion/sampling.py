"""The one sampling path: a sampler chosen by name from one registry, over one denoiser view of the model and
one guider, under ``torch.inference_mode`` and the requested autocast precision.

Everything that samples calls :func:`sample`: the notebook front-ends (``DDIMSampler``, ``PLMSSampler``, the
models' ``p_sample_loop``/``progressive_denoising``/``sample``/``sample_log``/``log_images``), the scripts and
the FID callback. Example::

    from ldm.models.diffusion.sampling import SamplingOptions, sample
    c = model.get_learned_conditioning(["a cat"] * 4)
    uc = model.get_unconditional_conditioning(4)
    z = sample(model, (4, 4, 32, 32), c, uncond=uc, scale=5.0,
               options=SamplingOptions(sampler="dpmpp_2m", steps=25, precision="bf16")).samples
    images = model.decode_first_stage(z)
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Any, Callable, Sequence

import torch

from ldm.models.diffusion.denoiser import Denoiser, DiffusionModel, SigmaDenoiser
from ldm.models.diffusion.discrete import (X0Transform, make_noise_sampler, sample_ddim, sample_ddpm,
                                           sample_plms)
from ldm.models.diffusion.guidance import CFGGuider, Conditioning, Guider
from ldm.models.diffusion.sigma_samplers import (get_sigmas_from_model, get_sigmas_karras, initial_noise_scale,
                                                 sample_dpmpp_2m, sample_euler, sample_euler_ancestral,
                                                 sample_heun)
from ldm.models.diffusion.timesteps import DiscreteSchedule, ddim_schedule, full_schedule, make_ddim_timesteps
from ldm.util import parse_enum


class SamplerKind(str, enum.Enum):
    DDIM = "ddim"
    PLMS = "plms"
    DDPM = "ddpm"
    DPMPP_2M = "dpmpp_2m"
    EULER = "euler"
    EULER_ANCESTRAL = "euler_ancestral"
    HEUN = "heun"


class SigmaSchedule(str, enum.Enum):
    KARRAS = "karras"      # Karras et al. 2022, eq. 5, between the model's sigma_min and sigma_max
    DISCRETE = "discrete"  # the model's own noise levels, evenly spaced in t


class Precision(str, enum.Enum):
    AUTOCAST = "autocast"  # float16 autocast on accelerators
    BF16 = "bf16"          # bfloat16 autocast on accelerators
    FULL = "full"


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A registry entry: the sampler function and the space it works in.

    :param fn: ``fn(denoiser, x, schedule_or_sigmas, extra_args=, callback=, disable=, ...) -> x``.
    :param sigma_space: True for k-diffusion samplers (a :class:`SigmaDenoiser` over decreasing sigmas), False
        for the discrete-time ones (a :class:`Denoiser` over a :class:`DiscreteSchedule`).
    """

    fn: Callable[..., torch.Tensor]
    sigma_space: bool


SAMPLERS: dict[SamplerKind, SamplerSpec] = {
    SamplerKind.DDIM: SamplerSpec(sample_ddim, sigma_space=False),
    SamplerKind.PLMS: SamplerSpec(sample_plms, sigma_space=False),
    SamplerKind.DDPM: SamplerSpec(sample_ddpm, sigma_space=False),
    SamplerKind.DPMPP_2M: SamplerSpec(sample_dpmpp_2m, sigma_space=True),
    SamplerKind.EULER: SamplerSpec(sample_euler, sigma_space=True),
    SamplerKind.EULER_ANCESTRAL: SamplerSpec(sample_euler_ancestral, sigma_space=True),
    SamplerKind.HEUN: SamplerSpec(sample_heun, sigma_space=True),
}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to sample (everything but the model, the conditioning and the noise).

    :param sampler: a :class:`SamplerKind` name.
    :param steps: sampling steps; DDPM with ``steps == num_timesteps`` runs the model's own schedule.
    :param eta: DDIM noise (0: deterministic, 1: DDPM-like); euler_ancestral's eta; PLMS needs 0.
    :param discretize: DDIM/PLMS/DDPM timestep spacing, ``uniform`` or ``quad``.
    :param sigma_schedule: the noise levels of the sigma-space samplers (:class:`SigmaSchedule`).
    :param precision: autocast on accelerators (:class:`Precision`); CPUs always run in full precision.
    :param temperature, noise_dropout, repeat_noise: how step noise is drawn (discrete samplers), as the
        original; `temperature` may be one value per step, in sampling order.
    :param clip_denoised: clamp each predicted x0 to [-1, 1] (pixel-space DDPM); :param quantize_denoised:
        snap each predicted x0 to the first stage's codebook (VQ first stages).
    :param log_every_t: record intermediates at schedule indices that are multiples of this (and the first).
    :param progress: show a progress bar.
    """

    sampler: SamplerKind | str = SamplerKind.DDIM
    steps: int = 50
    eta: float = 0.0
    discretize: str = "uniform"
    sigma_schedule: SigmaSchedule | str = SigmaSchedule.KARRAS
    precision: Precision | str = Precision.FULL
    temperature: float | Sequence[float] = 1.0
    noise_dropout: float = 0.0
    repeat_noise: bool = False
    clip_denoised: bool = False
    quantize_denoised: bool = False
    log_every_t: int = 100
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", parse_enum(SamplerKind, self.sampler, "sampler"))
        object.__setattr__(self, "sigma_schedule", parse_enum(SigmaSchedule, self.sigma_schedule, "sigma_schedule"))
        object.__setattr__(self, "precision", parse_enum(Precision, self.precision, "precision"))
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.sampler is SamplerKind.PLMS and self.eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {self.eta}")

    def replace(self, **changes: Any) -> "SamplingOptions":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class SamplingResult:
    """Samples [N x C x ...] and the recorded intermediates: ``x_inter`` (x_T, then x after the recorded
    steps) and ``pred_x0`` (x_T, then the predicted x0 at those steps)."""

    samples: torch.Tensor
    x_inter: list[torch.Tensor]
    pred_x0: list[torch.Tensor]

    @property
    def intermediates(self) -> dict[str, list[torch.Tensor]]:
        """The DDIM sampler's intermediates dict."""
        return {"x_inter": self.x_inter, "pred_x0": self.pred_x0}


def autocast(device: torch.device, precision: Precision | str = Precision.FULL) -> contextlib.AbstractContextManager:
    """Mixed precision on accelerators (float16 or bfloat16); a no-op on CPU or with ``full`` precision."""
    precision = parse_enum(Precision, precision, "precision")
    if precision is Precision.FULL or device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def discrete_schedule(model: DiffusionModel, options: SamplingOptions) -> DiscreteSchedule:
    """The timesteps (and their alphas, DDIM sigmas, posterior coefficients) a discrete sampler visits."""
    num_timesteps = len(model.alphas_cumprod)
    if options.sampler is SamplerKind.DDPM and options.steps == num_timesteps:
        return model_full_schedule(model, options.eta)
    steps = make_ddim_timesteps(options.discretize, options.steps, num_timesteps)
    return ddim_schedule(model.alphas_cumprod, steps, options.eta)


def model_full_schedule(model: DiffusionModel, eta: float = 0.0) -> DiscreteSchedule:
    """All T steps, with the model's own posterior buffers where it has them (the original DDPM's step)."""
    names = ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_log_variance_clipped")
    posterior = tuple(getattr(model, n, None) for n in names)
    return full_schedule(model.alphas_cumprod, model.alphas_cumprod_prev, eta,
                         None if any(p is None for p in posterior) else posterior)


def x0_transform(model: Any, options: SamplingOptions) -> X0Transform | None:
    """Clamping and/or codebook quantisation of the predicted x0, as the options ask (clamp first)."""
    steps = []
    if options.clip_denoised:
        steps.append(lambda x0: x0.clamp(-1.0, 1.0))
    if options.quantize_denoised:
        quantize = getattr(getattr(model, "first_stage_model", None), "quantize", None)
        if not callable(quantize):
            raise ValueError("quantize_denoised needs a first stage with a codebook (quantize)")
        steps.append(lambda x0: quantize(x0)[0])
    if not steps:
        return None

    def transform(x0: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x0 = step(x0)
        return x0
    return transform


def sample(model: DiffusionModel, shape: Sequence[int], cond: Conditioning = None, *,
           uncond: Conditioning = None, scale: float = 1.0, guider: Guider | None = None,
           options: SamplingOptions | None = None, x_T: torch.Tensor | None = None,
           mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
           schedule: DiscreteSchedule | torch.Tensor | None = None,
           callback: Callable[[dict], None] | None = None) -> SamplingResult:
    """Samples a batch of `shape` ([N x C x H x W]) from `model` with the sampler `options` name.

    :param cond: the encoded conditioning (a Tensor, a list, a dict for hybrid models, or None).
    :param uncond, scale: classifier-free guidance ``uc + scale * (c - uc)`` (a :class:`CFGGuider`);
        or give `guider` for anything else (guidance terms wrapping a CFGGuider).
    :param x_T: the initial standard normal noise (default: drawn here).
    :param mask: with `x0` (both [N x ...] latents): keep ``q_sample(x0, t)`` where the mask is 1 (inpainting);
        discrete samplers only.
    :param schedule: a :class:`DiscreteSchedule` or decreasing sigmas to use instead of the options' ones.
    :param callback: called after every step with ``{"i", "x", "denoised", ...}``.
    """
    options = options or SamplingOptions()
    if guider is not None and (uncond is not None or scale != 1.0):
        raise ValueError("give either guider or uncond/scale, not both")
    guider = guider if guider is not None else CFGGuider(scale, uncond)
    spec = SAMPLERS[options.sampler]
    device = model.alphas_cumprod.device
    x = torch.randn(tuple(shape), device=device) if x_T is None else x_T
    result = SamplingResult(x, [x], [x])
    grad_context = torch.no_grad() if guider.requires_grad else torch.inference_mode()
    with grad_context, autocast(device, options.precision):
        if spec.sigma_space:
            if mask is not None:
                raise ValueError(f"the {options.sampler.value} sampler does not support masks; use ddim, plms "
                                 f"or ddpm")
            denoiser = SigmaDenoiser(model, guider)
            grid = schedule if schedule is not None else sigma_levels(denoiser, options, device)
            x_start, total = x * initial_noise_scale(grid[0]), len(grid) - 1
            extra = {"eta": options.eta} if options.sampler is SamplerKind.EULER_ANCESTRAL else {}
        else:
            denoiser = Denoiser(model, guider)
            grid = schedule if schedule is not None else discrete_schedule(model, options)
            x_start, total = x, len(grid)
            extra = dict(noise_sampler=make_noise_sampler(options.temperature, options.noise_dropout,
                                                          options.repeat_noise),
                         mask=mask, x0=x0, x0_transform=x0_transform(model, options))

        def record(step: dict) -> None:
            index = step.get("index", total - 1 - step["i"])
            if index % options.log_every_t == 0 or index == total - 1:
                result.x_inter.append(step["x"])
                result.pred_x0.append(step["denoised"])
            if callback is not None:
                callback(step)

        result.samples = spec.fn(denoiser, x_start, grid, extra_args={"cond": cond}, callback=record,
                                 disable=not options.progress, **extra)
    return result


def sigma_levels(denoiser: SigmaDenoiser, options: SamplingOptions, device: torch.device) -> torch.Tensor:
    """The decreasing noise levels (ending at 0) of a sigma-space run of ``options.steps`` steps."""
    if options.sigma_schedule is SigmaSchedule.KARRAS:
        return get_sigmas_karras(options.steps, float(denoiser.sigma_min), float(denoiser.sigma_max), device=device)
    return get_sigmas_from_model(denoiser, options.steps).to(device)
