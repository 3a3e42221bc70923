#!/usr/bin/env python
"""Post-hoc EMA: write a checkpoint whose weights are the EMA of a length chosen after training (EDM2).

A run that kept power-function EMA profiles wrote snapshots ``phema-<step>-<sigma_rel>.safetensors``. This script
reconstructs the EMA of relative length ``--sigma_rel`` at ``--step`` (default: the latest snapshot) as a least-
squares combination of the snapshots, and writes it:

- with ``--ckpt`` (the run's checkpoint): a copy of that checkpoint's state dict in which the tracked weights
  ``model.*`` and the matching LitEma shadows ``model_ema.*`` are replaced by the reconstruction, so the output
  loads strictly into the run's config and samples the same with or without ``ema_scope``;
- without ``--ckpt``: only the reconstructed weights, under ``model.*`` (load with ``strict=False``).

The output is a ``.ckpt`` (``{"state_dict": ..., "posthoc_ema": {...}}``) or a ``.safetensors`` file, by its suffix.
List the snapshots and the reconstructable range first::

    python scripts/posthoc_ema.py --snapshots logs/<run>/posthoc_ema --list
    python scripts/posthoc_ema.py --snapshots logs/<run>/posthoc_ema --sigma_rel 0.08 \
        --ckpt logs/<run>/checkpoints/last.ckpt --out logs/<run>/checkpoints/phema-0.080.ckpt
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ldm.checkpoint import load_state_dict, save_checkpoint
from ldm.posthoc_ema import (DEFAULT_MAX_ERROR, apply_to_state_dict, list_snapshots,
                             reconstruct, reconstructable_range, snapshots_up_to)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshots", required=True, help="directory of the run's phema-*.safetensors snapshots")
    p.add_argument("--sigma_rel", type=float, help="the EMA length to reconstruct, in (0, 0.2887)")
    p.add_argument("--step", type=int, default=None, help="the snapshot step to reconstruct at (default: latest)")
    p.add_argument("--ckpt", default=None, help="the run's checkpoint that receives the weights")
    p.add_argument("--out", help="output .ckpt or .safetensors")
    p.add_argument("--prefix", default="model.", help="where the tracked module sits in the state dict")
    p.add_argument("--max_error", type=float, default=DEFAULT_MAX_ERROR,
                   help="largest accepted relative L2 error of the reconstructed EMA response")
    p.add_argument("--list", action="store_true", help="list the snapshots and the reconstructable range, then exit")
    args = p.parse_args(argv)
    if not args.list and (args.sigma_rel is None or args.out is None):
        p.error("--sigma_rel and --out are required (or use --list)")
    return args


def describe(args: argparse.Namespace) -> None:
    snapshots = list_snapshots(args.snapshots)
    for s in snapshots:
        print(f"step {s.step:>9}  t {s.t:>9}  sigma_rel {s.sigma_rel:.4f}  {s.path.name}")
    usable, t_out = snapshots_up_to(snapshots, args.step)
    span = reconstructable_range(usable, t_out, args.max_error)
    print(f"reconstructable at t={t_out} with max_error={args.max_error}: "
          + (f"sigma_rel in [{span[0]:.3f}, {span[1]:.3f}]" if span else "none"))


def main(argv: list[str] | None = None) -> Path | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        describe(args)
        return None
    snapshots = list_snapshots(args.snapshots)
    weights = reconstruct(snapshots, args.sigma_rel, step=args.step, max_error=args.max_error)
    if args.ckpt is not None:
        state_dict = apply_to_state_dict(load_state_dict(args.ckpt), weights, prefix=args.prefix)
    else:
        state_dict = {args.prefix + k: v for k, v in weights.items()}
    _, t_out = snapshots_up_to(snapshots, args.step)
    out = Path(args.out)
    save_checkpoint({"state_dict": state_dict,
                     "posthoc_ema": {"sigma_rel": args.sigma_rel, "t": t_out, "snapshots": str(args.snapshots)}},
                    out)
    print(f"wrote the post-hoc EMA of sigma_rel={args.sigma_rel} at t={t_out} to {out}")
    return out


if __name__ == "__main__":
    main()
