"""Exact resume, non-finite step guard and atomic checkpoint IO with a tiny Lightning model (CPU).

This file doubles as the training script that tests/test_reliability_signals.py runs in a subprocess:
``python tests/test_reliability_resume.py <workdir> <max_steps> [--slow-save SECONDS]``.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.checkpoint_io import AtomicCheckpointIO
from ldm.callbacks.data_order import ResumeDataOrder
from ldm.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from ldm.callbacks.preemption import PreemptionCheckpoint
from ldm.callbacks.reliability import reliability_plugins
from ldm.callbacks.seeding import StepSeeding
from ldm.data.sampler import ResumableSampler
from ldm.checkpoint import load_checkpoint

N_SAMPLES, BATCH = 40, 4  # 10 batches per epoch


class ToyModel(pl.LightningModule):
    """A tiny regressor with an EMA buffer, Adam and a step-wise LR schedule; records every batch it sees."""

    def __init__(self, nan_at_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.register_buffer("ema", torch.zeros(sum(p.numel() for p in self.net.parameters())))
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.nan_at_steps = set(nan_at_steps)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.extend(idx.tolist())
        noisy = x * self.scale_factor + 0.1 * torch.randn_like(x)  # like diffusion noise: needs the RNG state
        loss = torch.nn.functional.mse_loss(self.net(noisy), y)
        return self._maybe_nan(loss)

    def _maybe_nan(self, loss):
        """NaN at the batches (counted from 0 in this run) listed in `nan_at_steps`."""
        return loss * float("nan") if len(self.seen) // BATCH - 1 in self.nan_at_steps else loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().flatten() for p in self.net.parameters()])
        self.ema.mul_(0.9).add_(flat, alpha=0.1)
        self.scale_factor.fill_(1.0 + 0.01 * self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class TwoOptimiserModel(ToyModel):
    """Manual optimisation with two optimisers, like the stage-one autoencoder (generator and discriminator)."""

    def __init__(self, nan_at_steps: tuple[int, ...] = ()) -> None:
        super().__init__(nan_at_steps)
        self.automatic_optimization = False
        self.disc = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        x, y, idx = batch
        self.seen.extend(idx.tolist())
        noisy = x * self.scale_factor + 0.1 * torch.randn_like(x)
        loss = self._maybe_nan(torch.nn.functional.mse_loss(self.net(noisy), y))
        opt_g.zero_grad()
        self.manual_backward(loss + self.disc(self.net(x)).mean() * 0.01)
        opt_g.step()
        d_loss = self.disc(y).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        for sched in self.lr_schedulers():
            sched.step()

    def configure_optimizers(self):
        opt_g = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        opt_d = torch.optim.Adam(self.disc.parameters(), lr=1e-2, betas=(0.5, 0.9))
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.1 * s)) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], scheds


def make_loader(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 3, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True).sin(), torch.arange(N_SAMPLES))
    return DataLoader(data, batch_size=BATCH, sampler=ResumableSampler(N_SAMPLES, seed=seed), num_workers=0)


def make_trainer(root: Path, max_steps: int, callbacks=(), plugins=None) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                      default_root_dir=str(root), callbacks=list(callbacks),
                      plugins=plugins if plugins is not None else reliability_plugins(None))


class StopAtStep(pl.Callback):
    """Asks the pre-emption callback for a checkpoint after `step` steps, as a signal would."""

    def __init__(self, preempt: PreemptionCheckpoint, step: int) -> None:
        super().__init__()
        self.preempt, self.step = preempt, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.preempt.requested = 10  # SIGUSR1's number on Linux; only its presence matters


def _train(model_cls, root: Path, max_steps: int, stop_at: int | None = None, ckpt: Path | None = None,
           loader_fn=make_loader):
    """Trains a fresh `model_cls()` with the reliability callbacks; `stop_at` pre-empts it after that step."""
    pl.seed_everything(0, workers=True)
    model = model_cls()
    preempt = PreemptionCheckpoint(root / "checkpoints" / "last.ckpt")
    callbacks = [preempt, NonFiniteGuard(), StepSeeding(), ResumeDataOrder()]
    if stop_at is not None:
        callbacks.insert(0, StopAtStep(preempt, stop_at))
    trainer = make_trainer(root, max_steps, callbacks)
    trainer.fit(model, loader_fn(), ckpt_path=str(ckpt) if ckpt else None)
    return model, trainer


def assert_same_training_state(full, full_trainer, resumed, resumed_trainer) -> None:
    """Weights and buffers (EMA, scale_factor), optimiser moments, scheduler state and global step are equal."""
    assert resumed_trainer.global_step == full_trainer.global_step
    full_sd, resumed_sd = full.state_dict(), resumed.state_dict()
    assert full_sd.keys() == resumed_sd.keys()
    for name, a in full_sd.items():
        assert torch.equal(a, resumed_sd[name]), name
    full_opt, resumed_opt = _optimizer_tensors(full_trainer), _optimizer_tensors(resumed_trainer)
    assert len(full_opt) == len(resumed_opt) > 0
    assert all(torch.equal(a, b) for a, b in zip(full_opt, resumed_opt))
    for s_full, s_res in zip(full_trainer.lr_scheduler_configs, resumed_trainer.lr_scheduler_configs):
        assert s_full.scheduler.state_dict() == s_res.scheduler.state_dict()


def _optimizer_tensors(trainer):
    out = []
    for opt in trainer.optimizers:
        for state in opt.state_dict()["state"].values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("model_cls", [ToyModel, TwoOptimiserModel], ids=["one-optimiser", "two-optimisers"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, model_cls):
    k = 2 if model_cls is TwoOptimiserModel else 1  # Lightning counts every optimiser's step
    n = 13 * k  # 13 batches: not a multiple of the 10 batches per epoch, so the interruption is mid-epoch
    full, full_trainer = _train(model_cls, tmp_path / "full", 2 * n)
    part, part_trainer = _train(model_cls, tmp_path / "part", 2 * n, stop_at=n)
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert part_trainer.global_step == n and load_checkpoint(ckpt)["global_step"] == n
    resumed, resumed_trainer = _train(model_cls, tmp_path / "part", 2 * n, ckpt=ckpt)

    assert resumed_trainer.global_step == full_trainer.global_step == 2 * n
    assert part.seen + resumed.seen == full.seen  # the same batches in the same order, none repeated
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)


def test_resume_without_skipping_repeats_batches(tmp_path):
    """The mechanism matters: without ResumeDataOrder the resumed epoch starts over."""
    n = 13
    _train(ToyModel, tmp_path / "part", 2 * n, stop_at=n)
    pl.seed_everything(0, workers=True)
    model = ToyModel()
    trainer = make_trainer(tmp_path / "part", 2 * n)
    trainer.fit(model, make_loader(), ckpt_path=str(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    full, _ = _train(ToyModel, tmp_path / "full", 2 * n)
    assert model.seen != full.seen[n * BATCH:]


@pytest.mark.parametrize("model_cls", [ToyModel, TwoOptimiserModel], ids=["one-optimiser", "two-optimisers"])
def test_nonfinite_step_is_skipped_and_counted(tmp_path, model_cls):
    pl.seed_everything(0)
    model = model_cls(nan_at_steps=(3,))
    guard = NonFiniteGuard(max_consecutive=2)

    class Snapshot(pl.Callback):
        weights: dict[int, list[torch.Tensor]] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the generator's weights; the second optimiser's (finite) step of the same batch is taken
            self.weights[batch_idx] = [p.detach().clone() for p in pl_module.net.parameters()]

    snap = Snapshot()
    trainer = make_trainer(tmp_path, 6 * (2 if model_cls is TwoOptimiserModel else 1), [guard, snap])
    trainer.fit(model, make_loader())
    assert guard.skipped_total == 1 and guard.consecutive == 0
    assert all(torch.equal(a, b) for a, b in zip(snap.weights[2], snap.weights[3]))  # step 3 left them as they were
    assert not all(torch.equal(a, b) for a, b in zip(snap.weights[3], snap.weights[4]))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for opt in trainer.optimizers:  # Adam's moments were not fed the NaN either
        assert all(torch.isfinite(v).all() for s in opt.state.values() for v in s.values())


def test_consecutive_nonfinite_steps_stop_with_message(tmp_path):
    pl.seed_everything(0)
    model = ToyModel(nan_at_steps=(2, 3, 4))
    before = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                before.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})

    trainer = make_trainer(tmp_path, 20, [NonFiniteGuard(max_consecutive=3), Keep()])
    with pytest.raises(NonFiniteTrainingError, match=r"3 training batches in a row .*max_consecutive_nonfinite"):
        trainer.fit(model, make_loader())
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


@pytest.mark.parametrize("err", [errno.EACCES, errno.ENOSPC])
def test_atomic_io_keeps_previous_checkpoint_on_os_error(tmp_path, caplog, monkeypatch, err):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 1}, path)

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "replace" if err == errno.EACCES else "fsync", fail)
    with caplog.at_level(logging.ERROR):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io.failed_saves == 1 and str(path) in caplog.text
    assert ("permission denied" if err == errno.EACCES else "the disk is full") in caplog.text
    assert load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file was removed


class SlowIO(AtomicCheckpointIO):
    """Sleeps after writing the temporary file and before renaming it, so a test can kill the process there."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def _write(self, checkpoint, tmp):
        super()._write(checkpoint, tmp)
        if self.delay and checkpoint.get("global_step", 0) > 2:
            (tmp.parent / "SAVING").write_text(f"{tmp}\n{checkpoint['global_step']}")
            time.sleep(self.delay)


class PeriodicSave(pl.Callback):
    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.path)
        (self.path.parent / "STEP").write_text(str(trainer.global_step))


def main(argv: list[str] | None = None) -> None:
    """Trains the toy model in `workdir`; the signal tests drive this in a subprocess."""
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("max_steps", type=int)
    parser.add_argument("--slow-save", type=float, default=0.0)
    parser.add_argument("--step-delay", type=float, default=0.05)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    ckptdir = args.workdir / "checkpoints"
    ckptdir.mkdir(parents=True, exist_ok=True)

    class Delay(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            time.sleep(args.step_delay)

    callbacks = [PeriodicSave(ckptdir / "last.ckpt", 2), PreemptionCheckpoint(ckptdir / "last.ckpt"), Delay()]
    trainer = make_trainer(args.workdir, args.max_steps, callbacks, plugins=[SlowIO(args.slow_save)])
    trainer.fit(ToyModel(), make_loader())
    (args.workdir / "FINISHED").write_text(str(trainer.global_step))


if __name__ == "__main__":
    main()
