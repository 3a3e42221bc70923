"""``main.py`` on two CPU processes (gloo) against one process: the same training, at any world size.

Stage one and stage two train a few steps in one process with batch 4 and in two with batch 2 each (the same
global batch and seed). The test configs target subclasses (tests/helpers/distributed.py) that draw each sample's
noise, timestep, posterior sample and conditioning dropout from a generator seeded by (step, sample index), so a
sample's noise does not depend on the rank that trains it; data order and augmentation are the run's own
(ldm.data.sampler). Each process of a run writes its state and what it saw (``RankDump``).

The three ways to start the processes are all used: Lightning's own launcher (what ``--gpus 0,1`` selects),
``torchrun``, and SLURM's (``srun`` is simulated: two processes with the variables srun sets).
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint
from ldm.train import main
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
STAGE1, STAGE2 = CONFIGS / "ddp-stage1.yaml", CONFIGS / "ddp-stage2.yaml"
TOY = ROOT / "tests" / "helpers" / "toy.yaml"
TWO_CPU = ["lightning.trainer.accelerator=cpu", "data.params.batch_size=2"]
LIGHTNING_DDP = [*TWO_CPU, "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp"]
# Stage one compares in float64: in float32 an element whose gradient is rounding noise at the first step and signal
# later takes a different first Adam step in each run, which its final gradients no longer show.
FLOAT64 = ["lightning.trainer.precision=64-true"]
TIMEOUT = 420
N_SAMPLES = 16  # the test configs' dataset: 4 global batches of 4 per epoch


def dump(dir: Path) -> list[str]:
    return ["lightning.callbacks.rank_dump.target=tests.helpers.distributed.RankDump",
            f"lightning.callbacks.rank_dump.params.dir={dir}"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(command: list[str], log: Path, environ: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `command` in its own process group (so that a hung run is ended with every process it started)."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=environ or env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group (nothing, after a clean exit)
        except ProcessLookupError:
            pass


def run(command: list[str], log: Path, environ: dict[str, str] | None = None, expect_ok: bool = True) -> int:
    rc = finish(start(command, log, environ))
    if expect_ok:
        assert rc == 0, log.read_text()[-4000:]
    return rc


def main_py(*args: str) -> list[str]:
    return [sys.executable, "main.py", *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun(command: list[str], log: Path) -> None:
    """Runs `command` as two tasks of a one-node SLURM job, with the variables ``srun --ntasks-per-node=2`` sets."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        environ = {**env(), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldm-test", "SLURM_NTASKS": "2",
                   "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
                   "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": port}
        procs.append(start(command, log.with_suffix(f".rank{rank}.txt"), environ))
    for rank, proc in enumerate(procs):
        assert finish(proc) == 0, log.with_suffix(f".rank{rank}.txt").read_text()[-4000:]


def ranks(dir: Path) -> list[dict]:
    files = sorted(dir.glob("rank*.pt"))
    return [torch.load(f, weights_only=False) for f in files]


def only_run(logs: Path) -> Path:
    """The run's log dir (rank zero's: every rank of a torchrun or srun launch names the run by its own clock, and
    only rank zero writes)."""
    (logdir,) = [d for d in logs.iterdir() if (d / "configs").is_dir()]
    return logdir


def assert_ranks_identical(dumps: list[dict]) -> None:
    """DDP keeps every rank's model the same: parameters and buffers (EMA, scale_factor) bit for bit."""
    assert len(dumps) == 2
    a, b = (d["state_dict"] for d in dumps)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_training(ref: dict, other: dict, state: dict | None = None) -> None:
    """The parameters (and EMA) of `other` equal `ref`'s within float tolerance.

    Directions the loss does not depend on (a bias feeding a GroupNorm, an attention key bias) get gradients that
    are pure rounding noise, different in every run, and Adam turns noise into steps of up to the learning rate's
    size. Those elements are found from the gradients themselves (Adam's running mean and mean square, kept by
    RankDump): where the two runs' mean gradients (or, when only that is known, their root mean squares) differ by
    more than 1% of the root mean square. They must be
    few and changed by no more than a few Adam steps; every other element must agree to 1e-5 + 1e-4 |value|.
    """
    state = state if state is not None else other["state_dict"]
    assert other["global_step"] == ref["global_step"]
    grads_ref, grads_other = ref["grad_moments"], other["grad_moments"]
    ema_of = {"model_ema." + p[len("model."):].replace(".", ""): p for p in grads_ref if p.startswith("model.")}
    noise_total, total = 0, 0
    for name, value in ref["state_dict"].items():
        if not value.is_floating_point():
            assert torch.equal(value, state[name]), name
            continue
        param = ema_of.get(name, name)
        noise = torch.zeros_like(value, dtype=torch.bool)
        if param in grads_ref:
            (mean_ref, rms), (mean_other, rms_other) = grads_ref[param], grads_other[param]
            if mean_other is None:  # only the mean square is known
                noise = (rms - rms_other).abs() > 1e-2 * rms
            else:
                noise = (mean_ref - mean_other).abs() > 1e-2 * rms
        diff = (value - state[name]).abs()
        bad = (diff > 1e-5 + 1e-4 * value.abs()) & ~noise
        assert not bad.any(), f"{name}: differs by up to {diff[bad].max():.3g} where the gradients agree"
        assert diff[noise].le(4 * 3 * 1e-3).all(), name  # a few Adam steps of lr <= 1e-3 at most
        noise_total, total = noise_total + int(noise.sum()), total + value.numel()
    assert noise_total < 0.05 * total, (noise_total, total)


def assert_each_sample_once(seen: list[tuple[int, int]], epoch: int, complete: bool = True) -> None:
    indices = [i for e, i in seen if e == epoch]
    assert len(indices) == len(set(indices)), "a sample was trained on twice in one epoch"
    if complete:
        assert sorted(indices) == list(range(N_SAMPLES))


def csv_metric(logdir: Path, key: str) -> dict[int, float]:
    with open(next(logdir.glob("csv/version_*/metrics.csv"))) as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT)
def test_stage_one_under_srun_trains_as_one_process(tmp_path):
    """The autoencoder and its discriminator (two optimisers, manual optimisation, GAN on from step 0) train on two
    SLURM tasks without DDP's unused-parameter error, and take the same steps as one process."""
    main(["--base", str(STAGE1), "-t", "-l", str(tmp_path / "one"), *FLOAT64, *dump(tmp_path / "one_dump")])
    srun(main_py("--base", str(STAGE1), "-t", "-l", str(tmp_path / "two"), *TWO_CPU, *FLOAT64,
                 *dump(tmp_path / "two_dump")),
         tmp_path / "srun.txt")
    (ref,), two = ranks(tmp_path / "one_dump"), ranks(tmp_path / "two_dump")
    assert [d["cluster_environment"] for d in two] == ["SLURMEnvironment"] * 2 and two[0]["world_size"] == 2
    assert two[0]["auto_requeue"] is False  # the pre-emption callback re-queues after its own checkpoint
    assert ref["global_step"] == 6  # 3 batches, each stepping both optimisers
    assert_ranks_identical(two)
    assert_same_training(ref, two[0])
    # the adaptive GAN weight is computed from the gradients of the global batch
    one_log, two_log = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    d_one, d_two = csv_metric(one_log, "train/d_weight"), csv_metric(two_log, "train/d_weight")
    assert d_one.keys() == d_two.keys() and len(d_one) == 3
    assert all(d_two[s] == pytest.approx(d_one[s], rel=1e-4) for s in d_one)
    seen = two[0]["seen"] + two[1]["seen"]
    assert sorted(seen) == sorted(ref["seen"])  # the same samples, each once, split over the ranks
    assert_each_sample_once(seen, epoch=0, complete=False)
    assert [d["logged_images"] for d in two] == [3, 0]  # image grids from rank zero only
    assert len(list((two_log / "images" / "train").glob("reconstructions_*.png"))) == 3


@pytest.fixture(scope="module")
def stage_two_reference(tmp_path_factory) -> dict:
    """Stage two in one process: 6 steps (1.5 epochs) with batch 4."""
    tmp = tmp_path_factory.mktemp("ldm_one")
    main(["--base", str(STAGE2), "-t", "-l", str(tmp / "logs"), *dump(tmp / "dump")])
    (ref,) = ranks(tmp / "dump")
    return ref


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT)
def test_stage_two_ddp_preempted_then_resumed_at_two_and_at_one_process(tmp_path, stage_two_reference):
    """Stage two on two processes (Lightning's launcher), pre-empted by SIGUSR1 on rank 1 in the middle of the
    first epoch, then resumed on two processes (torchrun) and, from the same checkpoint, on one process with the
    same global batch: both end where one uninterrupted process does."""
    ref = stage_two_reference
    logs = tmp_path / "logs"
    run(main_py("--base", str(STAGE2), "-t", "-l", str(logs), *LIGHTNING_DDP, *dump(tmp_path / "part"),
                "model.params.signal_at_step=2", "model.params.signal_rank=1"), tmp_path / "part.txt")
    part = ranks(tmp_path / "part")
    logdir = only_run(logs)
    ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 == part[0]["global_step"]  # both ranks stopped after the signalled step
    assert_ranks_identical(part)
    assert [d["logged_images"] for d in part] == [1, 0]  # step 2's grid, from rank zero only
    # scale_by_std: the std of the whole first global batch, the same on both ranks and as in one process
    assert part[0]["state_dict"]["scale_factor"] == pytest.approx(float(ref["state_dict"]["scale_factor"]), rel=1e-5)
    assert part[0]["draws"] != part[1]["draws"]  # each rank draws its own noise in a normal run
    shutil.copytree(logdir, tmp_path / "for_one" / logdir.name)

    resume = ["-r", str(logdir), "-t", "model.params.signal_at_step=null"]
    run(torchrun(*resume, *dump(tmp_path / "rest")), tmp_path / "rest.txt")
    rest = ranks(tmp_path / "rest")
    assert rest[0]["strategy"] == "DDPStrategy" and rest[0]["cluster_environment"] == "TorchElasticEnvironment"
    assert_ranks_identical(rest)  # EMA included
    assert_same_training(ref, rest[0])
    for r in range(2):  # epoch 0 finished after the resume: each sample once over both runs and both ranks
        assert all(e == 0 for e, _ in part[r]["seen"])
    assert_each_sample_once(part[0]["seen"] + part[1]["seen"] + rest[0]["seen"] + rest[1]["seen"], epoch=0)
    assert_each_sample_once(rest[0]["seen"] + rest[1]["seen"], epoch=1, complete=False)

    one_logdir = tmp_path / "for_one" / logdir.name
    main(["-r", str(one_logdir), "-t", "model.params.signal_at_step=null", "lightning.trainer.devices=1",
          "lightning.trainer.strategy=auto", "data.params.batch_size=4", *dump(tmp_path / "one")])
    (one,) = ranks(tmp_path / "one")
    assert one["world_size"] == 1
    assert_same_training(ref, one)
    assert_each_sample_once(part[0]["seen"] + part[1]["seen"] + one["seen"], epoch=0)


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT)
def test_fsdp_trains_the_ldm_as_one_process_and_its_checkpoint_loads_strictly(tmp_path, stage_two_reference):
    """FSDP (UNet blocks as units, activation checkpointing) on two CPU processes takes the same steps as one
    process; its checkpoint is a full state dict with the model's keys."""
    logs = tmp_path / "logs"
    run(main_py("--base", str(STAGE2), "-t", "-l", str(logs), *TWO_CPU, "lightning.trainer.devices=2",
                "lightning.trainer.strategy=fsdp", "lightning.fsdp.activation_checkpointing=true",
                "model.params.use_ema=false"), tmp_path / "fsdp.txt")
    ckpt = load_checkpoint(only_run(logs) / "checkpoints" / "last.ckpt")
    config = OmegaConf.load(STAGE2)
    config.model.params.use_ema = False
    model = instantiate_from_config(config.model)
    assert list(ckpt["state_dict"]) == list(model.state_dict())  # the model's keys, in its order
    model.load_state_dict(ckpt["state_dict"], strict=True)
    ref = stage_two_reference
    # the full optimiser state FSDP gathers into the checkpoint is keyed by the index in model.parameters(); its
    # exp_avg is not usable on CPU (gathered on CPU it holds exp_avg_sq's values: see docs/distributed.md)
    names = [name for name, _ in model.named_parameters()]
    fsdp = {"state_dict": ckpt["state_dict"], "global_step": ckpt["global_step"],
            "grad_moments": {names[i]: (None, v["exp_avg_sq"].sqrt())
                             for i, v in ckpt["optimizer_states"][0]["state"].items()}}
    without_ema = {k: v for k, v in ref["state_dict"].items() if not k.startswith("model_ema.")}
    assert_same_training({**ref, "state_dict": without_ema}, fsdp)
    assert len(list((only_run(logs) / "images" / "train").glob("samples_*.png"))) == 3


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_one_failing_rank_ends_the_run_with_an_emergency_checkpoint_and_no_hang(tmp_path):
    """Rank 1 raises in step 3 while rank 0 waits in that step's gradient all-reduce: rank 0's collective fails, it
    writes last.ckpt (the state after step 3's predecessor, i.e. 3 steps) without waiting at a barrier, and the run
    exits with an error instead of hanging."""
    logs = tmp_path / "logs"
    rc = run(main_py("--base", str(TOY), "-t", "-l", str(logs), *LIGHTNING_DDP,
                     "model.target=tests.helpers.distributed.RankFailingToyModel", "model.params.fail_at_step=3",
                     "lightning.trainer.max_steps=100"), tmp_path / "out.txt", expect_ok=False)
    output = (tmp_path / "out.txt").read_text()
    assert rc != 0 and "toy failure on rank 1 at step 3" in output
    ckpt = load_checkpoint(only_run(logs) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3 and "saved checkpoint at global step 3" in output


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT)
def test_webdataset_parts_of_unequal_length_end_the_epoch_together(tmp_path):
    """Three shards of 5 samples over two ranks (torchrun): rank 0 reads 10 samples (5 batches), rank 1 reads 5 (3).
    Both train 3 steps per epoch and the run ends after its 2 epochs (a rank running ahead into the next epoch would
    pair its gradient all-reduces with another rank's steps, and the run would hang at its end)."""
    from tests.test_data_webdataset import write_shard

    for s in range(3):
        write_shard(tmp_path / f"shard-{s}.tar", [f"s{s}_{i:03d}" for i in range(5)])
    config = OmegaConf.load(STAGE1)
    config.model.target = "ldm.models.autoencoder.AutoencoderKL"
    config.data.params.train = {"target": "ldm.data.webdataset.WebImageCaptionDataset",
                                "params": {"urls": f"{tmp_path}/shard-{{0..2}}.tar", "size": 16}}
    OmegaConf.save(config, tmp_path / "stream.yaml")
    logs = tmp_path / "logs"
    run(torchrun("--base", str(tmp_path / "stream.yaml"), "-t", "-l", str(logs), *TWO_CPU,
                 "lightning.callbacks.image_logger=null", "lightning.trainer.max_steps=-1",
                 "lightning.trainer.max_epochs=2"), tmp_path / "out.txt")
    with open(next(only_run(logs).glob("csv/version_*/metrics.csv"))) as f:
        steps = [(int(r["epoch"]), int(r["step"])) for r in csv.DictReader(f) if r.get("train/aeloss_step")]
    assert steps == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
