"""Speed and memory of a config's networks, measured side by side in one run (interleaved rounds, medians).

    python scripts/benchmark.py --config configs/demo/ldm.yaml --vs diffusers
    python scripts/benchmark.py --config v1-inference.yaml --vs diffusers --batch-size 2 --latent-size 32 --flops
    python scripts/benchmark.py --config configs/ldm/cin-f4.yaml --compare compile --what train
    python scripts/benchmark.py --config configs/ldm/cin-f4.yaml --compare cache --batch-size 2
    python scripts/benchmark.py --config configs/ldm/cin-f4.yaml --compare checkpointing --what memory

Kinds of step (``--what``), each on random inputs of the config's shapes:
- ``train``: a UNet training step: forward, MSE loss, backward, AdamW step (fused where the device has it);
- ``sample``: a classifier-free-guided sampling step: one forward of the conditional and unconditional halves;
- ``encode`` / ``decode``: the first stage on [N x 3 x H x W] images / on latents;
- ``memory``: the peak memory of one training step (CUDA: the allocator's peak; CPU: the peak of the CPU
  allocator's allocations recorded by the profiler, plus the parameters, optimiser state and inputs held before);
- ``stage2`` (with ``--compare cache``): the LatentDiffusion training step (first-stage encoding, conditioning,
  UNet step), encoding images on the fly against reading the posterior from a latent cache.

Subjects: ours; ``--vs diffusers`` adds diffusers' UNet2DConditionModel / AutoencoderKL / VQModel built with the
same architecture (equal parameter counts are asserted); ``--compare X`` measures each implementation without and
with option X (compile, checkpointing, channels-last, cache). ``--compile``, ``--channels-last``,
``--checkpointing`` and ``--precision`` apply to every subject. Every subject runs each kind ``--steps`` times per
round for ``--repeats`` rounds in turn, after ``--warmup`` calls (which include compilation); the table shows medians
of wall time (the JSON also has process CPU time, steadier on a shared machine). ``--flops`` adds the achieved
TFLOP/s (FLOPs counted by torch.utils.flop_counter on the eager network) and their share of the device's dense
peak: a table of data-sheet numbers for known GPUs, else the best measured throughput of a 2048^3 matrix product
(labelled as such). ``--breakdown`` profiles one call of each kind and reports the share of its time in the dense
kernels (matrix products, convolutions, fused attention) and the fusion bound: total over dense time, the largest
speed-up that fusing (``torch.compile``) or removing all the other work could give. Never run in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from ldm.data.latent_cache import FINGERPRINT_KEY, KINDS, first_stage_fingerprint
from ldm.data.latent_cache_writer import split_encoding
from ldm.inference import get_device, load_config
from ldm.performance import apply_performance_options, compile_arguments, fused_adamw_supported
from ldm.util import count_params, instantiate_from_config

from benchmark_measure import (DTYPES, available_memory, count_flops, dense_breakdown, device_peak_tflops, machine,
                               peak_step_memory, progress, tensor_bytes, time_calls)

KINDS_OF_STEP = ("train", "sample", "encode", "decode", "memory", "stage2")
OPTIONS = ("compile", "checkpointing", "channels-last", "cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a stage-two YAML (model.params.unet_config, first_stage_config)")
    p.add_argument("--vs", choices=["diffusers"], default=None, help="also measure diffusers' networks")
    p.add_argument("--compare", choices=OPTIONS, default=None, help="each implementation without and with this")
    p.add_argument("--what", nargs="+", choices=KINDS_OF_STEP, default=None,
                   help="kinds of step (default: train sample encode decode memory; stage2 with --compare cache)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data batch size, else 4")
    p.add_argument("--latent-size", type=int, default=None, help="latent side (default: unet image_size)")
    p.add_argument("--context-length", type=int, default=None, help="tokens of the context (default: 77 for text)")
    p.add_argument("--steps", type=int, default=2, help="timed calls of each kind per round")
    p.add_argument("--repeats", type=int, default=2, help="rounds over the subjects, in alternating order "
                   "(an even number: each subject goes first equally often)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each kind first (compilation)")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument("--optimizer", choices=["adamw", "none"], default="adamw", help="'none': forward and backward")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--flops", action="store_true", help="achieved TFLOP/s and the share of the device's peak")
    p.add_argument("--breakdown", action="store_true", help="profile one call of each kind: the share of its time "
                   "in matmul/convolution/attention kernels and the most that fusing the rest could gain")
    p.add_argument("--reverse", action="store_true", help="build the subjects in the reverse order (diffusers "
                   "first) and start the alternating rounds with it: the check that a difference is not an effect "
                   "of the order")
    p.add_argument("--isolate", action="store_true", help="build each subject anew in each round and free it "
                   "after (one subject in memory at a time; automatic when two would not fit)")
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.compare == "cache" and args.vs:
        p.error("--compare cache measures our stage-two step only; drop --vs")
    return args


@dataclasses.dataclass(frozen=True)
class Options:
    """The speed options of one subject."""

    compile: bool = False
    checkpointing: bool = False
    channels_last: bool = False
    cache: bool = False

    def label(self) -> str:
        on = [f.name.replace("_", "-") for f in dataclasses.fields(self) if getattr(self, f.name)]
        return f" +{'+'.join(on)}" if on else ""


@dataclasses.dataclass
class Workload:
    """The inputs every subject gets (made once, on the device)."""

    batch: int
    latents: torch.Tensor  # [N x C x h x w]
    target: torch.Tensor  # [N x C_out x h x w]: what the training step regresses the UNet output on
    context: torch.Tensor | None  # [N x M x D]
    labels: torch.Tensor | None  # [N]
    images: torch.Tensor | None  # [N x 3 x H x W] in [-1, 1]
    autocast: Callable[[], contextlib.AbstractContextManager]


@dataclasses.dataclass
class Built:
    """One subject's networks and its step functions by kind."""

    params: dict[str, int]
    steps: dict[str, Callable[[], Any]]
    flop_steps: dict[str, Callable[[], Any]]  # eager versions, for counting FLOPs
    held_bytes: Callable[[], int]  # what a training step holds before it starts (weights, optimiser state, inputs)


def make_optimizer(params: list[torch.nn.Parameter], kind: str) -> torch.optim.Optimizer | None:
    if kind == "none":
        return None
    return torch.optim.AdamW(params, lr=1e-5, fused=fused_adamw_supported(params) or None)


def unet_steps(call: Callable, net: torch.nn.Module, w: Workload, optimizer: str, scale: float
               ) -> tuple[dict[str, Callable[[], Any]], torch.optim.Optimizer | None]:
    """The train and guided sampling steps of a UNet behind `call(x, t, context, y)`."""
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], optimizer)
    n = w.batch
    null = None if w.context is None else torch.zeros_like(w.context)
    x2 = torch.cat([w.latents, w.latents]).contiguous(memory_format=_layout(w.latents))
    c2 = None if w.context is None else torch.cat([w.context, null])
    y2 = None if w.labels is None else torch.cat([w.labels, w.labels])
    t2 = torch.full((2 * n,), 500, device=w.latents.device)

    def train() -> None:
        t = torch.randint(0, 1000, (n,), device=w.latents.device)
        with w.autocast():
            out = call(w.latents, t, w.context, w.labels)
        torch.nn.functional.mse_loss(out.float(), w.target).backward()
        if opt is not None:
            opt.step()
        net.zero_grad(set_to_none=True)

    def sample() -> torch.Tensor:
        with torch.inference_mode(), w.autocast():
            cond, uncond = call(x2, t2, c2, y2).chunk(2)
            return uncond + scale * (cond - uncond)

    return {"train": train, "sample": sample}, opt


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def first_stage_steps(encode: Callable, decode: Callable, w: Workload, latents: torch.Tensor
                      ) -> dict[str, Callable[[], Any]]:
    def run_encode() -> Any:
        with torch.inference_mode(), w.autocast():
            return encode(w.images)

    def run_decode() -> Any:
        with torch.inference_mode(), w.autocast():
            return decode(latents)

    return {"encode": run_encode, "decode": run_decode}


def strip_checkpoints(config: Any) -> Any:
    """The model config without weight files (random weights time the same)."""
    config = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
    for params in (config.model.params, *(config.model.params.get(k, {}).get("params") or {}
                                          for k in ("first_stage_config", "cond_stage_config")
                                          if OmegaConf.is_dict(config.model.params.get(k)))):
        if params.get("ckpt_path") is not None:
            params.ckpt_path = None
    return config


def build_ours(config: Any, options: Options, w: Workload, args: argparse.Namespace, kinds: list[str]) -> Built:
    params = config.model.params
    unet_cfg = OmegaConf.create(OmegaConf.to_container(params.unet_config))
    unet = instantiate_from_config(unet_cfg).to(w.latents.device)
    first_stage = None
    if any(k in kinds for k in ("encode", "decode")):
        first_stage = instantiate_from_config(params.first_stage_config).to(w.latents.device).eval()
    flop_steps = {}
    if args.flops:  # count on the eager networks, before any option changes them
        flop_steps.update(unet_steps(lambda x, t, c, y: unet(x, t, context=c, y=y), unet, w, "none",
                                     args.guidance_scale)[0])
    section = {"channels_last": options.channels_last, "activation_checkpointing": options.checkpointing,
               "compile": options.compile}
    apply_performance_options(unet, section, device_type=w.latents.device.type)
    steps, opt = unet_steps(lambda x, t, c, y: unet(x, t, context=c, y=y), unet, w, args.optimizer,
                            args.guidance_scale)
    counts = {"unet": count_params(unet)}
    if first_stage is not None:
        z = torch.randn(w.batch, *first_stage_latent_shape(params.first_stage_config, w.images),
                        device=w.latents.device)
        encode = _sampled(first_stage.encode)
        if args.flops:
            flop_steps.update(first_stage_steps(encode, first_stage.decode, w, z))
        apply_performance_options(first_stage, {"channels_last": options.channels_last, "compile": options.compile},
                                  device_type=w.latents.device.type)
        steps.update(first_stage_steps(encode, first_stage.decode, w, z))
        counts["first_stage"] = first_stage_param_count(first_stage)
    return Built(counts, steps, flop_steps, lambda: held_bytes(unet, opt, w))


def _sampled(encode: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """encode(x) as a latent: a sample of a posterior, or the tensor itself."""
    def run(x: torch.Tensor) -> torch.Tensor:
        out = encode(x)
        return out if isinstance(out, torch.Tensor) else out.sample()
    return run


def first_stage_latent_shape(cfg: Any, images: torch.Tensor) -> tuple[int, int, int]:
    dd = cfg.params.ddconfig
    f = 2 ** (len(dd.get("ch_mult", (1, 2, 4, 8))) - 1)
    return int(cfg.params.embed_dim), images.shape[2] // f, images.shape[3] // f


def held_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer | None, w: Workload) -> int:
    state = [] if opt is None else [v for s in opt.state.values() for v in s.values()]
    return tensor_bytes([*net.parameters(), *net.buffers(), *state, w.latents, w.target, w.context, w.labels])


def build_diffusers(config: Any, options: Options, w: Workload, args: argparse.Namespace, kinds: list[str],
                    ours: dict[str, int]) -> Built:
    import benchmark_diffusers as peer

    params = config.model.params
    unet, call = peer.build_unet(params.unet_config.params, ours["unet"])
    unet = unet.to(w.latents.device)
    flop_steps = {}
    if args.flops:
        flop_steps.update(unet_steps(call, unet, w, "none", args.guidance_scale)[0])
    if options.checkpointing:
        unet.enable_gradient_checkpointing()
    _diffusers_layout_and_compile(unet, options)
    steps, opt = unet_steps(call, unet, w, args.optimizer, args.guidance_scale)
    counts = {"unet": count_params(unet)}
    if any(k in kinds for k in ("encode", "decode")):
        fs = params.first_stage_config
        vae, encode, decode = peer.build_autoencoder(fs.target, fs.params, ours["first_stage"])
        vae = vae.to(w.latents.device).eval()
        z = torch.randn(w.batch, *first_stage_latent_shape(fs, w.images), device=w.latents.device)
        if args.flops:
            flop_steps.update(first_stage_steps(encode, decode, w, z))
        _diffusers_layout_and_compile(vae, options)
        steps.update(first_stage_steps(encode, decode, w, z))
        counts["first_stage"] = count_params(vae)
    return Built(counts, steps, flop_steps, lambda: held_bytes(unet, opt, w))


def _diffusers_layout_and_compile(net: torch.nn.Module, options: Options) -> None:
    if options.channels_last:
        net.to(memory_format=torch.channels_last)
        net.register_forward_pre_hook(lambda m, a, k: (tuple(
            x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.ndim == 4 else x
            for x in a), k), with_kwargs=True)
    if options.compile:  # with the arguments that ours gets on this device
        net.compile(**compile_arguments({}, net, next(net.parameters()).device.type))


def build_stage_two(config: Any, options: Options, w: Workload, args: argparse.Namespace) -> Built:
    """The LatentDiffusion training step on images (encoded on the fly) or, with ``options.cache``, on the
    cached posterior of the same images."""
    model = instantiate_from_config(config.model).to(w.latents.device)
    apply_performance_options(model, {"channels_last": options.channels_last, "compile": options.compile,
                                      "activation_checkpointing": options.checkpointing or None},
                              device_type=w.latents.device.type)
    model.learning_rate = 1e-5
    model.train()
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    batch = stage_two_batch(model, config, w)
    if options.cache:
        with torch.no_grad():
            kind, values = split_encoding(model.first_stage_model.encode(w.images))
        fingerprint = first_stage_fingerprint(model.first_stage_model)
        batch = {k: v for k, v in batch.items() if k != model.first_stage_key}
        batch.update({KINDS[kind]: values, FINGERPRINT_KEY: [fingerprint] * w.batch})

    def step() -> None:
        loss, _ = model.shared_step(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    held = lambda: tensor_bytes([*model.parameters(), *model.buffers(), *batch.values(),  # noqa: E731
                                 *(v for s in opt.state.values() for v in s.values())])
    return Built({"unet": count_params(model.model)}, {"stage2": step}, {}, held)


def stage_two_batch(model: Any, config: Any, w: Workload) -> dict[str, Any]:
    """A batch as the datasets give it: images [N x H x W x 3] and the conditioning the config's model reads."""
    batch: dict[str, Any] = {model.first_stage_key: w.images.permute(0, 2, 3, 1)}
    key = model.cond_stage_key
    if model.model.conditioning_key is None or key == model.first_stage_key:
        return batch
    if key == "class_label" or hasattr(model.cond_stage_model, "n_classes"):
        n = int(getattr(model.cond_stage_model, "n_classes", 1000))
        batch[model.label_key] = torch.randint(0, n, (w.batch,), device=w.images.device)
    elif key in ("caption", "txt"):
        batch[key] = ["a photograph of an astronaut riding a horse"] * w.batch
    elif model.model.conditioning_key == "concat":  # a map at the latent size, e.g. super-resolution's LR_image
        channels = int(config.model.params.unet_config.params.in_channels) - int(model.channels)
        batch[key] = torch.rand(w.batch, *w.latents.shape[-2:], channels, device=w.images.device) * 2 - 1
    else:
        raise ValueError(f"--compare cache: cannot make a '{key}' conditioning for this config")
    return batch


def make_workload(config: Any, args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format
                  ) -> Workload:
    p = config.model.params.unet_config.params
    n = args.batch_size or int(OmegaConf.select(config, "data.params.batch_size", default=4))
    size = args.latent_size or int(p.image_size)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, int(p.in_channels), size, size, generator=g).to(device, memory_format=memory_format)
    target = torch.randn(n, int(p.out_channels), size, size, generator=g).to(device)
    context = labels = None
    if p.get("context_dim"):
        text = config.model.params.get("cond_stage_key") in ("caption", "txt")
        length = args.context_length or (77 if text else 1)
        context = torch.randn(n, length, int(p.context_dim), generator=g).to(device)
    if p.get("num_classes"):
        labels = torch.randint(0, int(p.num_classes), (n,), generator=g).to(device)
    fs = config.model.params.get("first_stage_config")
    images = None
    if fs is not None and "ddconfig" in fs.get("params", {}):
        f = 2 ** (len(fs.params.ddconfig.get("ch_mult", (1, 2, 4, 8))) - 1)
        side = size * f if args.latent_size else int(fs.params.ddconfig.resolution)
        images = (torch.rand(n, 3, side, side, generator=g) * 2 - 1).to(device, memory_format=memory_format)
    dtype = DTYPES[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    return Workload(n, latents, target, context, labels, images, autocast)


def fits_together(config: Any, args: argparse.Namespace, device: torch.device, n: int) -> bool:
    """Whether `n` subjects fit in memory at once: float32 parameters and gradients (and AdamW's two moments)
    of each UNet, with a 10 % margin for activations, within 80 % of the available memory."""
    free = available_memory(device)
    if free is None:
        return True
    bytes_per_param = 4 * (2 + 2 * (args.optimizer == "adamw")) * 1.1
    with torch.device("meta"):
        params = count_params(instantiate_from_config(config.model.params.unet_config))
    return bytes_per_param * params * n <= 0.8 * free


def subjects_of(args: argparse.Namespace) -> list[tuple[str, Options]]:
    base = Options(compile=args.compile, checkpointing=args.checkpointing, channels_last=args.channels_last)
    variants = [base]
    if args.compare:
        variants.append(dataclasses.replace(base, **{args.compare.replace("-", "_"): True}))
    implementations = ["ours"] + (["diffusers"] if args.vs else [])
    return [(f"{impl}{v.label()}", v) for impl in implementations for v in variants]


def round_order(subjects: list[tuple[str, Options]], r: int, reverse: bool = False) -> list[tuple[str, Options]]:
    """The subjects' turns in round `r` (and, for round 0, the order in which they are built): as listed in even
    rounds and reversed in odd ones (the other way round with `reverse`), so that over an even number of rounds
    every subject has the same mean turn (ours and diffusers: each goes first in half the rounds)."""
    return subjects[::-1] if (r % 2 == 1) != reverse else subjects


def first_stage_param_count(first_stage: torch.nn.Module) -> int:
    """Parameters of a first stage without its training loss (LPIPS, discriminator), which sampling never uses."""
    return sum(p.numel() for n, p in first_stage.named_parameters() if not n.startswith("loss."))


def our_param_counts(config: Any) -> dict[str, int]:
    """The parameter counts of our UNet and first stage (without the loss), built on the meta device."""
    params = config.model.params
    with torch.device("meta"):
        counts = {"unet": count_params(instantiate_from_config(params.unet_config))}
        if "ddconfig" in params.first_stage_config.get("params", {}):
            counts["first_stage"] = first_stage_param_count(instantiate_from_config(params.first_stage_config))
    return counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = get_device(args.device)
    config = strip_checkpoints(load_config(args.config))
    kinds = args.what or (["stage2"] if args.compare == "cache" else ["train", "sample", "encode", "decode", "memory"])
    if "stage2" in kinds and args.compare != "cache":
        raise SystemExit("--what stage2 compares encoding on the fly with the latent cache: use --compare cache")
    w = make_workload(config, args, device, torch.channels_last if args.channels_last else torch.contiguous_format)
    if w.images is None:
        kinds = [k for k in kinds if k not in ("encode", "decode")]
    subjects = subjects_of(args)
    records: dict[str, dict[str, Any]] = {name: {"timings": {k: [] for k in kinds}} for name, _ in subjects}
    ours_params = our_param_counts(config) if args.vs else {}

    def build(name: str, options: Options) -> Built:
        if options.cache or args.compare == "cache":
            return build_stage_two(config, options, w, args)
        if name.startswith("diffusers"):
            return build_diffusers(config, options, w, args, kinds, ours_params)
        return build_ours(config, options, w, args, kinds)

    def prepare(name: str, options: Options) -> Built:
        progress(f"building and warming up {name}")
        built = build(name, options)
        rec = records[name]
        rec["params"] = built.params
        for kind in kinds:
            if kind in built.steps:
                for _ in range(args.warmup):
                    built.steps[kind]()
        if "memory" in kinds and "peak_memory_bytes" not in rec:  # after the warm-up: the optimiser state exists
            step = built.steps.get("train") or built.steps["stage2"]
            rec["peak_memory_bytes"] = peak_step_memory(step, built.held_bytes(), device)
        if args.flops and "flops" not in rec:
            rec["flops"] = {k: count_flops(f) for k, f in built.flop_steps.items() if k in kinds}
        if args.breakdown and "breakdown" not in rec:
            rec["breakdown"] = {k: dense_breakdown(f, device) for k, f in built.steps.items() if k in kinds}
        return built

    isolate = args.isolate or not fits_together(config, args, device, len(subjects))
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = machine()["load_average"]
    build_order = round_order(subjects, 0, args.reverse)
    built = {} if isolate else {name: prepare(name, options) for name, options in build_order}
    for r in range(args.repeats):
        for name, options in round_order(subjects, r, args.reverse):
            subject = prepare(name, options) if isolate else built[name]
            for kind in kinds:
                if kind in subject.steps:
                    records[name]["timings"][kind] += time_calls(subject.steps[kind], args.steps, device)
                    progress(f"round {r + 1}/{args.repeats} {name} {kind}: "
                             f"{', '.join(f'{t[0]:.3g}' for t in records[name]['timings'][kind][-args.steps:])} s")
            if isolate:
                del subject
                gc.collect()
    result = summarize(args, device, w.batch, kinds, records, started, load_before, isolate)
    print(format_table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def summarize(args: argparse.Namespace, device: torch.device, batch: int, kinds: list[str], records: dict[str, Any],
              started: str, load_before: list[float], isolate: bool) -> dict[str, Any]:
    peak = device_peak_tflops(device, args.precision) if args.flops else None
    subjects = {}
    for name, rec in records.items():
        out: dict[str, Any] = {"params": rec.get("params")}
        for kind in kinds:
            times = rec["timings"].get(kind) or []
            if not times:
                continue
            wall = statistics.median(t[0] for t in times)
            entry = {"median_s": round(wall, 4), "median_cpu_s": round(statistics.median(t[1] for t in times), 4),
                     "calls": len(times), "images_per_s": round(batch / wall, 3)}
            flops = (rec.get("flops") or {}).get(kind)
            if flops:
                entry["tflop_per_step"] = round(flops / 1e12, 4)
                entry["tflops"] = round(flops / wall / 1e12, 4)
                entry["share_of_peak"] = round(flops / wall / 1e12 / peak["tflops"], 4)
                if "cpu_tflops" in peak:  # per busy core: FLOPs over the CPU time of all threads
                    cpu_tflops = flops / entry["median_cpu_s"] / 1e12
                    entry["cpu_tflops_per_core"] = round(cpu_tflops, 4)
                    entry["share_of_peak_cpu_time"] = round(cpu_tflops / peak["cpu_tflops"], 4)
            if kind in (rec.get("breakdown") or {}):
                entry["breakdown"] = rec["breakdown"][kind]
            out[kind] = entry
        if "peak_memory_bytes" in rec:
            out["peak_memory_GiB"] = round(rec["peak_memory_bytes"] / 2 ** 30, 3)
        subjects[name] = out
    return {"config": args.config, "date": started, "device": str(device), "machine": machine(),
            "load_average_before": load_before, "batch_size": batch, "precision": args.precision,
            "optimizer": args.optimizer, "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
            "isolated": isolate, "peak": peak, "subjects": subjects,
            "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]])}


ROWS = {"train": "train step", "sample": "guided sampling step", "encode": "first-stage encode",
        "decode": "first-stage decode", "stage2": "stage-two training step"}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per measure, one column per subject, and the speed ratio of the first subject
    to each other one (> 1: the first is faster)."""
    cpu = result["device"] == "cpu"
    names = list(result["subjects"])
    subjects = [result["subjects"][n] for n in names]
    first = subjects[0]
    header = ["measure", *names] + [f"{names[0]} vs {n}" for n in names[1:]]
    rows = []
    for kind, label in ROWS.items():
        if kind not in first:
            continue
        cells = [_time_cell(s[kind], cpu) if kind in s else "-" for s in subjects]
        ratios = [_ratio_cell(first[kind], s[kind], cpu) if kind in s else "-" for s in subjects[1:]]
        rows.append([label + " (median)", *cells, *ratios])
        if "tflops" in first[kind]:
            rows.append([f"{label}: TFLOP/s (share of peak)", *[_flops_cell(s.get(kind, {})) for s in subjects],
                         *["" for _ in subjects[1:]]])
        if "breakdown" in first[kind]:
            rows.append([f"{label}: time in matmul/conv/attention (fusion bound)",
                         *[_breakdown_cell(s.get(kind, {})) for s in subjects], *["" for _ in subjects[1:]]])
    if "peak_memory_GiB" in first:
        memory = [s.get("peak_memory_GiB", float("nan")) for s in subjects]
        rows.append(["train step peak memory", *[f"{m:.3g} GiB" for m in memory],
                     *[f"{m / memory[0]:.2f}x" for m in memory[1:]]])
    params = ["parameters (UNet / first stage)",
              *[" / ".join(f"{v / 1e6:.2f} M" for v in (s.get("params") or {}).values()) for s in subjects],
              *["" for _ in subjects[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in [*rows, params]]
    m = result["machine"]
    lines.append(f"\n{result['config']}, batch {result['batch_size']}, {result['precision']}, {result['device']} "
                 f"({m['cpu']}, {m.get('gpu', 'no GPU')}, {m['torch_threads']} threads, torch {m['torch']}), "
                 f"{result['date']}; load average {result['load_average_before']} before, {m['load_average']} after; "
                 f"medians of {result['repeats']} rounds x {result['steps']} calls")
    if cpu:
        lines.append("times: median wall time (median process CPU time of all threads); ratios: wall (CPU time)")
    if result.get("peak"):
        peak = result["peak"]
        per_core = f", {1000 * peak['cpu_tflops']:.3g} GFLOP/s per busy core" if "cpu_tflops" in peak else ""
        lines.append(f"peak: {peak['tflops']:.3g} TFLOP/s{per_core} ({peak['source']}); on CPU the share is "
                     f"by CPU time (FLOPs per CPU second against the same for the matrix product)")
    return "\n".join(lines)


def _time_cell(entry: dict[str, Any], cpu: bool) -> str:
    cell = f"{entry['median_s']:.4g} s ({entry['images_per_s']:.3g} img/s)"
    return cell.replace(" s (", f" s [CPU {entry['median_cpu_s']:.4g} s] (") if cpu else cell


def _ratio_cell(first: dict[str, Any], other: dict[str, Any], cpu: bool) -> str:
    cell = f"{other['median_s'] / first['median_s']:.2f}x"
    return f"{cell} ({other['median_cpu_s'] / first['median_cpu_s']:.2f}x)" if cpu else cell


def _breakdown_cell(entry: dict[str, Any]) -> str:
    if "breakdown" not in entry:
        return "-"
    b = entry["breakdown"]
    return f"{100 * b['dense_share']:.0f} % ({b['fusion_bound']:.2f}x)"


def _flops_cell(entry: dict[str, Any]) -> str:
    if "tflops" not in entry:
        return "-"
    share = entry.get("share_of_peak_cpu_time", entry["share_of_peak"])
    return f"{entry['tflops']:.3g} ({100 * share:.1f} %)"


if __name__ == "__main__":
    main()
