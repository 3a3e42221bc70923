"""Throughput and memory of a config's UNet: training steps and guided sampling steps, per precision and layout.

    python scripts/benchmark.py --config configs/ldm/cin-f4.yaml --batch-size 16 --precision bf16 --device cuda
    python scripts/benchmark.py --config configs/demo/ldm.yaml --batch-size 32           # CPU

Builds ``model.params.unet_config`` of the config alone (no first stage, no conditioner: random latents and
a random context of the UNet's ``context_dim``), then times `--steps` training steps (forward, loss, backward,
AdamW) and `--steps` classifier-free-guided sampling forwards (batch doubled), after `--warmup` untimed ones.
Prints one JSON line: images/s for both, seconds per step, and the peak accelerator memory. Never run in CI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.inference import get_device, load_config  # noqa: E402
from ldm.util import count_params, instantiate_from_config  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a YAML with model.params.unet_config")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (and compilation with --compile)")
    p.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (use_checkpoint)")
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of `fn` over `steps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = get_device(args.device)
    cfg = load_config(args.config)
    unet_cfg = cfg.model.params.unet_config
    if args.checkpointing:
        unet_cfg.params.use_checkpoint = True
    unet = instantiate_from_config(unet_cfg).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    net = torch.compile(unet) if args.compile else unet
    p = unet_cfg.params
    size, n = int(p.image_size), args.batch_size
    x = torch.randn(n, int(p.in_channels), size, size, device=device).to(memory_format=memory_format)
    context_dim = p.get("context_dim")
    context = torch.randn(n, 77, int(context_dim), device=device) if context_dim else None
    y = torch.randint(0, int(p.num_classes), (n,), device=device) if p.get("num_classes") else None
    dtype = DTYPES[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def train_step() -> None:
        t = torch.randint(0, 1000, (n,), device=device)
        with autocast:
            loss = torch.nn.functional.mse_loss(net(x, t, context=context, y=y).float(), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    x2 = torch.cat([x, x])
    c2 = torch.cat([context, context]) if context is not None else None
    y2 = torch.cat([y, y]) if y is not None else None

    @torch.no_grad()
    def guided_forward() -> None:
        with autocast:
            net(x2, torch.full((2 * n,), 500, device=device), context=c2, y=y2)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = timed(train_step, args.steps, args.warmup, device)
    train_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    unet.eval()
    sample_s = timed(guided_forward, args.steps, args.warmup, device)
    result = {"config": args.config, "device": str(device), "params_M": round(count_params(unet) / 1e6, 2),
              "batch_size": n, "latent": [int(p.in_channels), size, size], "precision": args.precision,
              "channels_last": args.channels_last, "compile": args.compile, "checkpointing": args.checkpointing,
              "train_step_s": round(train_s, 4), "train_images_per_s": round(n / train_s, 2),
              "guided_step_s": round(sample_s, 4), "guided_images_per_s": round(n / sample_s, 2),
              "train_peak_memory_GiB": None if train_peak is None else round(train_peak / 2 ** 30, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
