"""Test-only pieces for comparing multi-process training with one process (tests/test_distributed_main.py).

A DDP run and a one-process run see the same global batches, but a model's noise comes from each process's
random generator, so their noise differs even when the data agree. The subclasses here draw every random quantity
of a training step (the posterior sample of the KL autoencoder, the diffusion noise and timestep, the conditioning
dropout) from a generator seeded by (global step, sample index), so the noise of a sample does not depend on which
rank trains it or on the per-rank batch size; everything else is the models' own code. :class:`RankDump` writes
what each rank saw and holds at the end of training.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.conditioning import drop_conditioning
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config
from tests.helpers.toy import ToyModel


class IndexedDataset(Dataset):
    """The dataset built from `dataset` (a config), with each item's index added as ``index``."""

    def __init__(self, dataset: Mapping[str, Any]) -> None:
        self.data = instantiate_from_config(dataset)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "index": i}


def per_sample(index: torch.Tensor, step: int, salt: int, fn: Any) -> torch.Tensor:
    """``fn(generator)`` for each sample, with a generator seeded by (step, sample index, salt); stacked."""
    out = []
    for i in index.tolist():
        g = torch.Generator().manual_seed((step * 1_000_003 + int(i) * 7919 + salt) % (2 ** 63))
        out.append(fn(g))
    return torch.stack(out)


class PerSampleNoise:
    """Mixin: remembers the batch's sample indices and step; draws per-sample noise from them; records the indices
    each training batch held (``seen``: [(epoch, index), ...]) and the training steps it took."""

    seen: list[tuple[int, int]]

    def _remember(self, batch: Mapping[str, Any]) -> None:
        if not hasattr(self, "seen"):
            self.seen = []
        self._index = torch.as_tensor(batch["index"]).cpu()
        self._step = int(self.global_step)

    def _randn(self, like: torch.Tensor, salt: int) -> torch.Tensor:
        noise = per_sample(self._index, self._step, salt, lambda g: torch.randn(like.shape[1:], generator=g))
        return noise.to(like)

    def _posterior(self, posterior: DiagonalGaussianDistribution, salt: int) -> Any:
        model = self

        class Seeded:  # the posterior, sampled with per-sample noise
            def sample(self) -> torch.Tensor:
                return posterior.mean + posterior.std * model._randn(posterior.mean, salt)

            def mode(self) -> torch.Tensor:
                return posterior.mode()

            def kl(self, *args: Any) -> torch.Tensor:
                return posterior.kl(*args)

        return Seeded()


class EquivalenceAutoencoderKL(PerSampleNoise, AutoencoderKL):
    """AutoencoderKL whose training posterior sample is drawn per sample (see the module docstring)."""

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self._remember(batch)
        self.seen += [(self.current_epoch, int(i)) for i in self._index]
        return super().training_step(batch, batch_idx)

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        posterior = self._posterior(self.encode(x), salt=1)
        return self.decode(posterior.sample()), posterior


class EquivalenceLatentDiffusion(PerSampleNoise, LatentDiffusion):
    """LatentDiffusion whose training noise, timesteps, posterior samples and conditioning dropout are drawn per
    sample (see the module docstring).

    :param signal_at_step: send SIGUSR1 to this process in the training step at this global step.
    :param signal_rank: ... on this rank only.
    """

    def __init__(self, *args: Any, signal_at_step: int | None = None, signal_rank: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.signal_at_step = signal_at_step
        self.signal_rank = signal_rank
        self.conditions.drop = self._seeded_drop  # the condition builder draws its dropout from the global generator


    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._remember(batch)
        super().on_train_batch_start(batch, batch_idx)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen += [(self.current_epoch, int(i)) for i in self._index]
        if self.signal_at_step == self.global_step and self.global_rank == self.signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return super().training_step(batch, batch_idx)

    def encode_first_stage(self, x: torch.Tensor) -> Any:
        posterior = super().encode_first_stage(x)
        return self._posterior(posterior, salt=2) if self.training else posterior

    def sample_noise(self, x_start: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().sample_noise(x_start)
        return self._randn(x_start, salt=3)

    def sample_timesteps(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().sample_timesteps(x)
        t = per_sample(self._index, self._step, 4, lambda g: torch.randint(0, self.num_timesteps, (), generator=g))
        return t.to(x.device)

    def _seeded_drop(self, xc: Any, device: torch.device | None = None) -> Any:
        """ConditionBuilder.drop with each example's dropout decided by its own generator."""
        builder = self.conditions
        u = per_sample(self._index, self._step, 5, lambda g: torch.rand((), generator=g))
        return drop_conditioning(xc, (u < builder.ucg_rate).to(self.device), builder.null_label, builder.label_key)


class RankDump(pl.Callback):
    """At the end of training, writes ``<dir>/rank<r>.pt``: this rank's state dict, the running mean and root mean
    square of each parameter's gradients as Adam tracks them (``grad_moments``: ``exp_avg`` and the square root of
    ``exp_avg_sq``), the samples it trained on
    (``seen``), whether it called ``log_images`` (``logged_images``), and one draw of the global generator per
    training batch (``draws``; after the run's per-step seeding, so it shows whether ranks draw different noise)."""

    def __init__(self, dir: str) -> None:
        self.dir = Path(dir)
        self.draws: list[float] = []
        self.logged_images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        original = pl_module.log_images

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.logged_images += 1
            return original(*args, **kwargs)

        pl_module.log_images = counted

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.draws.append(float(torch.rand(())))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        names = {id(p): n for n, p in pl_module.named_parameters()}
        moments = {names[id(p)]: (s["exp_avg"].cpu(), s["exp_avg_sq"].sqrt().cpu()) for opt in trainer.optimizers
                   for p, s in opt.state.items() if "exp_avg_sq" in s}
        torch.save({"state_dict": state, "grad_moments": moments, "seen": list(getattr(pl_module, "seen", [])), "draws": self.draws,
                    "logged_images": self.logged_images, "world_size": trainer.world_size,
                    "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
                    "auto_requeue": getattr(getattr(trainer.strategy, "cluster_environment", None), "auto_requeue",
                                            None),
                    "strategy": type(trainer.strategy).__name__,
                    "global_step": trainer.global_step}, self.dir / f"rank{trainer.global_rank}.pt")


class RankFailingToyModel(ToyModel):
    """The toy model (one optimiser), failing at `fail_at_step` on rank `fail_rank` only (the other ranks carry on
    into the step's gradient all-reduce)."""

    def __init__(self, fail_rank: int = 1, fail_at_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_rank, self.fail_on_rank_at = fail_rank, fail_at_step
        self.critic.requires_grad_(False)  # used only by the two-optimiser variant; DDP wants no idle parameters

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.global_step == self.fail_on_rank_at and self.global_rank == self.fail_rank:
            raise RuntimeError(f"toy failure on rank {self.global_rank} at step {self.global_step}")
        return super().training_step(batch, batch_idx)
