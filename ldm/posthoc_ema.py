"""Post-hoc EMA reconstruction: the EMA of any length, after training, from power-function EMA snapshots.

Training keeps a few power-function EMA profiles (:class:`ldm.modules.power_ema.PowerFunctionEMA`) and writes
their weights as ``phema-<step>-<sigma_rel>.safetensors`` snapshots at regular intervals. Here the snapshots are
read, the least-squares coefficients of the wanted length are solved (:func:`ldm.modules.power_ema.solve_coefficients`)
and the weighted sum of the snapshots is formed, one snapshot in memory at a time. A length whose response the
snapshots cannot match to within `max_error` (relative L2 residual) is refused with an error that names it and
the range of lengths that can be reconstructed. :func:`apply_to_state_dict` puts the weights into a full model
state dict (``model.*`` and, where present, ``model_ema.*``) so that the result loads like a training checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.checkpoint import CheckpointError, key_listing, read_safetensors
from ldm.modules.ema import shadow_name
from ldm.modules.power_ema import MAX_SIGMA_REL, SNAPSHOT_FORMAT, sigma_rel_to_gamma, solve_coefficients

logger = logging.getLogger(__name__)

DEFAULT_MAX_ERROR = 0.1  # relative L2 error of the reconstructed response that is accepted by default
_RANGE_GRID = np.round(np.arange(0.001, MAX_SIGMA_REL, 0.001), 3)


class PostHocEMAError(ValueError):
    """A wanted EMA length or time cannot be reconstructed from the snapshots at hand."""


@dataclass(frozen=True)
class Snapshot:
    """One power-function EMA snapshot file: its update count t, the global step, sigma_rel and gamma."""

    path: Path
    t: int
    step: int
    sigma_rel: float
    gamma: float


def read_snapshot(path: str | Path) -> Snapshot:
    """The metadata of one snapshot file (the tensors are not read).

    :raises FileNotFoundError, CheckpointError: naming the file when it is missing, unreadable or not a post-hoc
        EMA snapshot.
    """
    path = Path(path)
    _, meta = read_safetensors(path, tensors=False, description="post-hoc EMA snapshot")
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise CheckpointError(f"{path} is not a post-hoc EMA snapshot (metadata format {meta.get('format')!r}, "
                              f"expected {SNAPSHOT_FORMAT!r})")
    try:
        return Snapshot(path, int(meta["t"]), int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"post-hoc EMA snapshot {path} has bad metadata ({e}): {meta}") from None


def list_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots ``phema-*.safetensors`` in `directory`, sorted by (t, sigma_rel).

    :raises FileNotFoundError: naming the directory when it is missing or holds no snapshot.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"post-hoc EMA snapshot directory not found: {directory}")
    snapshots = sorted((read_snapshot(p) for p in directory.glob("phema-*.safetensors")),
                       key=lambda s: (s.t, s.sigma_rel))
    if not snapshots:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (phema-*.safetensors) in {directory}")
    return snapshots


def snapshots_up_to(snapshots: Sequence[Snapshot], step: int | None = None) -> tuple[list[Snapshot], int]:
    """The snapshots usable for a reconstruction at `step` (default: the latest) and that time's update count.

    :raises PostHocEMAError: naming `step` when no snapshot was taken at it.
    """
    if not snapshots:
        raise PostHocEMAError("no post-hoc EMA snapshots given")
    if step is None:
        t_out = max(s.t for s in snapshots)
    else:
        times = {s.t for s in snapshots if s.step == step}
        if not times:
            steps = [str(s) for s in sorted({s.step for s in snapshots})]
            raise PostHocEMAError(f"no post-hoc EMA snapshot at step {step}; "
                                  + key_listing("snapshot steps", steps))
        t_out = max(times)
    return [s for s in snapshots if s.t <= t_out], t_out


def reconstructable_range(snapshots: Sequence[Snapshot], t_out: int,
                          max_error: float = DEFAULT_MAX_ERROR) -> tuple[float, float] | None:
    """The smallest and largest sigma_rel (on a 0.001 grid) that `snapshots` reconstruct at `t_out` to within
    `max_error`, or None when there is none."""
    times, gammas = [s.t for s in snapshots], [s.gamma for s in snapshots]
    ok = [s for s in _RANGE_GRID
          if solve_coefficients(times, gammas, t_out, sigma_rel_to_gamma(float(s)))[1] <= max_error]
    return (float(min(ok)), float(max(ok))) if ok else None


def plan(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None,
         max_error: float = DEFAULT_MAX_ERROR) -> tuple[list[tuple[Snapshot, float]], float]:
    """The snapshots and coefficients that reconstruct the EMA of length `sigma_rel` at `step`.

    :return: ([(snapshot, coefficient)], the relative L2 residual of the reconstructed response).
    :raises PostHocEMAError: naming `sigma_rel` when it is outside (0, 1/sqrt(12)) or its residual exceeds
        `max_error`; the message gives the reconstructable range.
    """
    usable, t_out = snapshots_up_to(snapshots, step)
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError as e:
        raise PostHocEMAError(str(e)) from None
    coeffs, error = solve_coefficients([s.t for s in usable], [s.gamma for s in usable], t_out, gamma)
    if error > max_error:
        span = reconstructable_range(usable, t_out, max_error)
        where = (f"these snapshots reconstruct sigma_rel in [{span[0]:.3f}, {span[1]:.3f}]" if span else
                 "these snapshots reconstruct no length to that accuracy")
        raise PostHocEMAError(
            f"EMA length sigma_rel={sigma_rel} is outside the reconstructable range at t={t_out}: its relative "
            f"error would be {error:.3f} > max_error={max_error} ({len(usable)} snapshots of lengths "
            f"{sorted({s.sigma_rel for s in usable})}); {where}. More frequent snapshots or profiles closer to "
            f"the wanted length widen it.")
    return list(zip(usable, coeffs.tolist())), error


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None,
                max_error: float = DEFAULT_MAX_ERROR, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The reconstructed EMA weights of length `sigma_rel` at `step`, keyed as the snapshots are.

    Sums in float64 on the CPU (memory: twice the float32 weights) and returns the snapshots' dtype.

    :raises PostHocEMAError: see :func:`plan`.
    :raises CheckpointError: naming the file and the keys when the snapshots do not hold the same tensors.
    """
    terms, error = plan(snapshots, sigma_rel, step, max_error)
    logger.info("post-hoc EMA sigma_rel=%s from %d snapshots (response error %.4f)", sigma_rel, len(terms), error)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    disable = None if progress is None else not progress
    for snapshot, coeff in tqdm(terms, desc=f"post-hoc EMA {sigma_rel}", disable=disable):
        weights, _ = read_safetensors(snapshot.path, description="post-hoc EMA snapshot")
        if not total:
            dtypes = {k: v.dtype for k, v in weights.items()}
            total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items()}
        _check_same_tensors(total, weights, snapshot.path)
        for key, value in weights.items():
            total[key].add_(value.double(), alpha=coeff)
    return {k: v.to(dtypes[k]) for k, v in total.items()}


def _check_same_tensors(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in expected if k in got and got[k].shape != expected[k].shape]
    problems = [key_listing(title, items) for title, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
    if problems:
        raise CheckpointError(f"post-hoc EMA snapshot {path} does not match the other snapshots: "
                              + "; ".join(problems))


def apply_to_state_dict(state_dict: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                        prefix: str = "model.", ema_prefix: str | None = "model_ema.") -> dict[str, torch.Tensor]:
    """A copy of a model state dict with the tracked weights replaced by `weights`.

    :param state_dict: e.g. the ``state_dict`` of the run's checkpoint.
    :param weights: reconstructed weights keyed by parameter name relative to the tracked module.
    :param prefix: where the tracked module sits in `state_dict` (``model.`` for a DDPM's DiffusionWrapper).
    :param ema_prefix: also overwrite the LitEma shadows ``<ema_prefix><name without dots>`` where the state dict
        has them (so that sampling with or without ``ema_scope`` uses the reconstruction); None: leave them.
    :raises CheckpointError: naming the keys that `state_dict` lacks or holds with another shape.
    """
    out = dict(state_dict)
    missing = [prefix + k for k in weights if prefix + k not in out]
    mismatched = [f"{prefix}{k} {tuple(v.shape)} vs {tuple(out[prefix + k].shape)}"
                  for k, v in weights.items() if prefix + k in out and out[prefix + k].shape != v.shape]
    if missing or mismatched:
        raise CheckpointError("the reconstructed EMA does not fit the checkpoint: "
                              + "; ".join(key_listing(title, items) for title, items in
                                          (("missing keys", missing), ("shape mismatches", mismatched)) if items))
    for key, value in weights.items():
        out[prefix + key] = value.to(out[prefix + key].dtype)
        if ema_prefix is not None and ema_prefix + shadow_name(key) in out:
            out[ema_prefix + shadow_name(key)] = value.to(out[ema_prefix + shadow_name(key)].dtype)
    return out
