"""The pieces of multi-process training, in one process: the per-rank sampler and item seeds, stream batches that
end together, per-rank step seeds, the strategy/devices/launcher checks, the FSDP strategy for an LDM, the SLURM
re-queue and resume, and the learning-rate rule at a world size. (tests/test_distributed_main.py runs them for
real on two processes.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.callbacks.preemption import PreemptionCheckpoint, slurm_requeue_command
from ldm.callbacks.seeding import StepSeeding
from ldm.callbacks.setup import SetupCallback
from ldm.cli import get_parser, resolve_run
from ldm.data.sampler import ItemSeededDataset, ResumableSampler
from ldm.datamodule import DataModuleFromConfig, StreamLoader
from ldm.strategies import UNetFSDPStrategy, apply_launcher, check_devices, check_strategy, distributed_arguments
from ldm.train import configure_learning_rate, main
from ldm.util import ConfigError, instantiate_from_config
from tests.helpers.toy import ToyModel

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "helpers" / "toy.yaml"
STAGE2 = ROOT / "tests" / "configs" / "ddp-stage2.yaml"


# --- data -------------------------------------------------------------------------------------------------------
def _rank_batches(length: int, world: int, batch: int, epoch: int = 0, skip: int = 0) -> list[list[list[int]]]:
    out = []
    for rank in range(world):
        sampler = ResumableSampler(length, seed=3, num_replicas=world, rank=rank, batch_size=batch)
        sampler.set_epoch(epoch)
        if skip:
            sampler.skip(skip)
        order = list(sampler)
        out.append([order[i:i + batch] for i in range(0, len(order), batch)])
    return out


def test_ranks_split_each_epoch_into_the_global_batches_of_one_process():
    (single,) = _rank_batches(16, world=1, batch=4)
    two = _rank_batches(16, world=2, batch=2)
    assert sorted(i for b in two[0] + two[1] for i in b) == list(range(16))  # each sample once, none dropped
    assert len(two[0]) == len(two[1]) == len(single) == 4
    for k, batch in enumerate(single):  # the ranks' k-th batches together are one process's k-th batch
        assert sorted(two[0][k] + two[1][k]) == sorted(batch)
    assert _rank_batches(16, 1, 4, epoch=1) != [single]


def test_uneven_lengths_keep_batch_counts_equal_without_repeating():
    # 19 samples, 2 ranks, batch 4: 10 and 9 samples, 3 batches each: everything is used
    a, b = _rank_batches(19, world=2, batch=4)
    assert len(a) == len(b) == 3 and sorted(i for x in a + b for i in x) == list(range(19))
    # 17 samples, batch 2: 9 and 8 samples would be 5 and 4 batches; the epoch's last position is left out
    a, b = _rank_batches(17, world=2, batch=2)
    used = [i for x in a + b for i in x]
    assert len(a) == len(b) == 4 and len(used) == len(set(used)) == 16


def test_skipping_consumed_samples_continues_the_order_at_another_world_size():
    (single,) = _rank_batches(16, world=1, batch=4)
    order = [i for b in single for i in b]
    (rest_one,) = _rank_batches(16, world=1, batch=4, skip=8)
    rest_two = _rank_batches(16, world=2, batch=2, skip=8)
    assert [i for b in rest_one for i in b] == order[8:]
    assert sorted(i for b in rest_two[0] + rest_two[1] for i in b) == sorted(order[8:])
    with pytest.raises(ValueError, match="multiple"):
        ResumableSampler(16, num_replicas=2, rank=0).skip(3)


class _RandomItems(Dataset):
    """Item i is a draw of the global torch generator (as a random augmentation would be)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "value": torch.rand(())}


def _augmentations(world: int, batch: int, epoch: int = 0, workers: int = 0) -> dict[int, float]:
    values = {}
    for rank in range(world):
        sampler = ResumableSampler(16, seed=7, num_replicas=world, rank=rank, batch_size=batch, item_seeds=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(ItemSeededDataset(_RandomItems()), batch_size=batch, sampler=sampler,
                            num_workers=workers)
        for b in loader:
            values.update(zip(b["index"].tolist(), b["value"].tolist()))
    return values


def test_an_items_augmentation_depends_on_seed_epoch_and_index_only():
    one = _augmentations(world=1, batch=4)
    assert one == _augmentations(world=2, batch=2) == _augmentations(world=1, batch=3, workers=2)
    assert one != _augmentations(world=1, batch=4, epoch=1)


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.n))


def test_stream_batches_end_together_on_every_rank():
    """Two ranks (threads) whose streams hold 5 and 3 batches vote before each batch: both train 3."""
    barrier, flags = threading.Barrier(2), [None, None]

    def vote(rank: int):
        def agree(flag: bool) -> bool:
            flags[rank] = flag
            barrier.wait()
            result = all(flags)
            barrier.wait()
            return result
        return agree

    got: dict[int, list] = {}

    def train(rank: int, n: int) -> None:
        got[rank] = list(StreamLoader(DataLoader(_Stream(n), batch_size=2), agree=vote(rank)))

    threads = [threading.Thread(target=train, args=(0, 10)), threading.Thread(target=train, args=(1, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [len(got[0]), len(got[1])] == [3, 3]
    loader = StreamLoader(DataLoader(_Stream(4), batch_size=2))
    _set_sampler_epoch(loader, 3)  # what Lightning does at each epoch start
    assert loader.loader.dataset.epoch == 3 and len(list(loader)) == 2


def test_datamodule_gives_streams_a_stream_loader_and_map_datasets_the_rank_sampler():
    stream = DataModuleFromConfig(batch_size=2, num_workers=0,
                                  train={"target": "tests.helpers.toy.ToyStream", "params": {"length": 5}})
    stream.setup()
    assert isinstance(stream.train_dataloader(), StreamLoader)
    data = DataModuleFromConfig(batch_size=2, num_workers=0,
                                train={"target": "tests.helpers.toy.ToyDataset", "params": {"size": 8}})
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)
    data.setup()
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, ResumableSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)


def test_step_seeds_differ_between_ranks_and_repeat_for_a_rank():
    def draw(rank: int, step: int) -> float:
        StepSeeding(seed=5).on_train_batch_start(SimpleNamespace(global_step=step, global_rank=rank), None, None, 0)
        return float(torch.rand(()))

    assert draw(0, 3) != draw(1, 3) and draw(0, 3) == draw(0, 3) and draw(0, 3) != draw(0, 4)


# --- strategy, devices, launchers: errors before any process starts ---------------------------------------------
def test_unknown_strategy_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"lightning.trainer.strategy: unknown strategy 'dpp' \(did you mean ddp"):
        check_strategy("dpp")
    with pytest.raises(ConfigError, match="choose one of: auto, ddp,.*fsdp"):
        check_strategy("horovod")
    check_strategy("ddp_find_unused_parameters_true")


def test_devices_that_do_not_exist_are_named():
    with pytest.raises(ConfigError, match=r"--gpus=\[0, 1\]: this machine has no GPU.*accelerator=cpu"):
        check_devices("gpu", [0, 1], "--gpus", available=0)
    with pytest.raises(ConfigError, match=r"no GPU 3 on this machine; valid GPU indices are 0..1"):
        check_devices("gpu", [0, 3], "--gpus", available=2)
    with pytest.raises(ConfigError, match="lightning.trainer.devices=4: asks for 4 GPUs but this machine has 2"):
        check_devices("gpu", 4, "lightning.trainer.devices", available=2)
    check_devices("gpu", [0, 1], "--gpus", available=2)
    check_devices("cpu", 8, "lightning.trainer.devices", available=0)


@pytest.mark.parametrize("args,key", [
    (["--gpus", "0,1"], "--gpus"),
    (["lightning.trainer.strategy=dpp"], "lightning.trainer.strategy"),
    (["lightning.trainer.strategy=fsdp", "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2"],
     "lightning.trainer.strategy: fsdp shards the UNet"),
])
def test_bad_distributed_settings_fail_in_main_before_training(tmp_path, args, key, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=key):
        main(["--base", str(TOY), "-t", "-l", str(tmp_path / "logs"), *args])
    assert not list((tmp_path / "logs").glob("*/checkpoints"))


def test_fsdp_for_an_ldm_with_ema_names_the_ema_key(tmp_path):
    with pytest.raises(ConfigError, match="model.params.use_ema"):
        main(["--base", str(STAGE2), "-t", "-l", str(tmp_path / "logs"), "lightning.trainer.strategy=fsdp",
              "lightning.trainer.accelerator=cpu", "lightning.trainer.devices=2"])


def test_launchers_set_devices_and_nodes_or_say_what_contradicts_them():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}
    kw = apply_launcher({"accelerator": "cpu", "devices": 1}, torchrun)
    assert kw == {"accelerator": "cpu", "devices": 2, "num_nodes": 2, "strategy": "ddp"}
    with pytest.raises(ConfigError, match=r"lightning.trainer.devices=\[0, 1, 2\].*started 2 processes per node"):
        apply_launcher({"accelerator": "gpu", "devices": [0, 1, 2]}, torchrun)
    slurm = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_JOB_NAME": "train"}
    assert apply_launcher({"accelerator": "gpu", "devices": [0, 1, 2, 3]}, slurm)["num_nodes"] == 2
    with pytest.raises(ConfigError, match="lightning.trainer.num_nodes=3 contradicts the srun launch on 2"):
        apply_launcher({"accelerator": "gpu", "devices": 4, "num_nodes": 3}, slurm)
    assert apply_launcher({"devices": 1}, {**slurm, "SLURM_JOB_NAME": "interactive"}) == {"devices": 1}
    kw = distributed_arguments({"accelerator": "cpu", "devices": 1}, ToyModel(), environ=slurm)
    (environment,) = kw["plugins"]
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False


def test_several_gpus_synchronise_batch_norm_unless_the_config_says_no(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed_arguments({"accelerator": "gpu", "devices": [0, 1]}, ToyModel(), environ={})["sync_batchnorm"]
    kw = distributed_arguments({"accelerator": "gpu", "devices": [0, 1], "sync_batchnorm": False}, ToyModel(),
                               environ={})
    assert kw["sync_batchnorm"] is False
    assert "sync_batchnorm" not in distributed_arguments({"accelerator": "gpu", "devices": [0]}, ToyModel(),
                                                         environ={})


def test_fsdp_strategy_wraps_unet_blocks_and_leaves_frozen_stages_out():
    from ldm.modules.diffusionmodules.unet_blocks import TimestepEmbedSequential

    config = OmegaConf.load(STAGE2)
    config.model.params.use_ema = False
    model = instantiate_from_config(config.model)
    kw = distributed_arguments({"accelerator": "cpu", "devices": 2, "strategy": "fsdp"}, model,
                               OmegaConf.create({"fsdp": {"activation_checkpointing": True}}), environ={})
    strategy = kw["strategy"]
    assert isinstance(strategy, UNetFSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TimestepEmbedSequential}
    assert strategy.kwargs["ignored_modules"] == [model.first_stage_model]  # the class embedder is trained
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {TimestepEmbedSequential}
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed", logger=False)
    assert trainer.strategy.mixed_precision_config.param_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown lightning.fsdp key.*activation_checkpointng"):
        distributed_arguments({"strategy": "fsdp"}, model, OmegaConf.create({"fsdp": {"activation_checkpointng": 1}}))
    with pytest.raises(ConfigError, match="lightning.fsdp.sharding_strategy: unknown 'HYBRID'; choose one of: FULL"):
        distributed_arguments({"strategy": "fsdp"}, model, OmegaConf.create({"fsdp": {"sharding_strategy": "HYBRID"}}))
    with pytest.raises(ConfigError, match="lightning.fsdp is set but lightning.trainer.strategy is 'ddp'"):
        distributed_arguments({"strategy": "ddp"}, model, OmegaConf.create({"fsdp": {"cpu_offload": True}}))


def test_learning_rate_uses_and_reports_the_trainers_world_size(caplog):
    model, config = ToyModel(), OmegaConf.create({"model": {"base_learning_rate": 1e-3},
                                                  "data": {"params": {"batch_size": 4}}})
    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", logger=False)
    with caplog.at_level("INFO", logger="main"):
        lr = configure_learning_rate(model, config, trainer, scale=True)
    assert lr == pytest.approx(2 * 3 * 4 * 1e-3) == model.learning_rate
    assert "world size of 6 process(es) and a global batch of 24" in caplog.text


# --- SLURM: re-queue after the pre-emption checkpoint, resume after the re-queue -----------------------------------
class _Preempt(pl.Callback):
    def __init__(self, preempt: PreemptionCheckpoint, signum: int) -> None:
        self.preempt, self.signum = preempt, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.preempt.requested = self.signum


@pytest.mark.parametrize("signum,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_preemption_requeues_on_sigusr1_only(tmp_path, signum, requeued):
    marker = tmp_path / "requeued"
    preempt = PreemptionCheckpoint(tmp_path / "last.ckpt",
                                   requeue=[sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"])
    data = DataModuleFromConfig(batch_size=4, num_workers=0,
                                train={"target": "tests.helpers.toy.ToyDataset", "params": {"size": 16}})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[_Preempt(preempt, signum),
                                                                                           preempt])
    trainer.fit(ToyModel(), data)
    assert trainer.global_step == 2 and (tmp_path / "last.ckpt").is_file() and preempt.stopped
    assert marker.exists() == requeued
    assert not preempt.snapshot_path.exists()
    assert slurm_requeue_command({"SLURM_JOB_ID": "17"}) == ["scontrol", "requeue", "17"]
    assert slurm_requeue_command({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "2"}) == [
        "scontrol", "requeue", "9_2"]
    assert slurm_requeue_command({}) is None


@pytest.mark.slow
def test_the_same_signal_twice_before_the_save_ends_a_stuck_process(tmp_path):
    """A run stuck in a collective never reaches the step end where the checkpoint is saved: a second SIGTERM ends
    it (the first only asks for the checkpoint)."""
    script = ("import os, signal, time\n"
              "from ldm.callbacks.preemption import PreemptionCheckpoint\n"
              "cb = PreemptionCheckpoint('unused.ckpt')\n"
              "signal.signal(signal.SIGTERM, cb._handle)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "print('asked', cb.requested == signal.SIGTERM, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGTERM)\n"
              "time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGTERM and "asked True" in proc.stdout
    assert "received SIGTERM again before the checkpoint could be saved" in proc.stderr


def test_a_requeued_slurm_job_resumes_the_run_its_command_started(tmp_path):
    argv = ["--base", "cfg.yaml", "-t", "-l", str(tmp_path)]
    opt, _ = get_parser().parse_known_args(argv)
    job = {"SLURM_JOB_ID": "4242"}
    first = resolve_run(opt, "T1", argv, job)
    assert first.resume_ckpt is None and first.job_marker.parent == tmp_path / ".slurm_runs"
    SetupCallback(resume="", now="T1", logdir=str(first.logdir), ckptdir=str(first.ckptdir), cfgdir=str(first.cfgdir),
                  config=OmegaConf.create({}), lightning_config=OmegaConf.create({}),
                  job_marker=str(first.job_marker)).write()
    restarted = {**job, "SLURM_RESTART_COUNT": "1"}
    assert resolve_run(opt, "T2", argv, restarted).resume_ckpt is None  # no checkpoint yet: a new run
    (first.ckptdir / "last.ckpt").write_bytes(b"")
    again = resolve_run(opt, "T2", argv, restarted)
    assert again.logdir == first.logdir.resolve() and again.resume_ckpt == first.ckptdir.resolve() / "last.ckpt"
    other_command = [*argv, "model.params.x=1"]  # e.g. the next stage in the same job script
    assert resolve_run(opt, "T2", other_command, restarted).resume_ckpt is None
    assert resolve_run(opt, "T2", argv, job).resume_ckpt is None  # the same job, not re-queued
