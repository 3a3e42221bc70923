"""ldm.runs: a main.py run folder resolves to its merged config and its last or best checkpoint; anything else
fails naming what is missing."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.checkpoint import load_checkpoint
from ldm.cli import resolve_run
from ldm.inference import add_run_arguments, model_files
from ldm.runs import (RunFolderError, best_checkpoint, locate_checkpoint, resolve_run_folder,
                      run_folder_of_checkpoint, saved_configs)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"
MONITOR = "val/loss_simple_ema"


def _callback_state(logdir: Path, best: str | None, monitor: str | None = MONITOR) -> dict:
    """What Lightning 2's ModelCheckpoint saves, recorded at another location (the run was moved since)."""
    old = f"/elsewhere/{logdir.name}/checkpoints"
    key = f"ModelCheckpoint{{'monitor': {monitor!r}, 'mode': 'min'}}"
    return {key: {"monitor": monitor, "best_model_path": f"{old}/{best}" if best else "",
                  "best_model_score": torch.tensor(0.25) if best else None, "dirpath": old,
                  "best_k_models": {f"{old}/{best}": torch.tensor(0.25)} if best else {}}}


def fake_run(root: Path, name: str = "2024-01-01T00-00-00_ldm", best: str | None = "epoch=000001.ckpt",
             monitor: str | None = MONITOR) -> Path:
    """A synthetic run folder: two starts (configs t1, t2), last.ckpt recording `best`, three epoch files."""
    logdir = root / name
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / "configs").mkdir()
    for stamp in ("2024-01-01T00-00-00", "2024-01-02T00-00-00"):
        (logdir / "configs" / f"{stamp}-project.yaml").write_text(f"model: {{stamp: {stamp}}}\n")
        (logdir / "configs" / f"{stamp}-lightning.yaml").write_text("lightning: {}\n")
    for epoch in range(3):
        torch.save({"state_dict": {}, "epoch": epoch}, logdir / "checkpoints" / f"epoch={epoch:06}.ckpt")
    torch.save({"state_dict": {}, "callbacks": _callback_state(logdir, best, monitor)},
               logdir / "checkpoints" / "last.ckpt")
    return logdir


def test_last_and_best_of_a_synthetic_run(tmp_path):
    logdir = fake_run(tmp_path)
    last = resolve_run_folder(logdir)
    assert last.checkpoint == logdir / "checkpoints" / "last.ckpt"
    assert last.config == logdir / "configs" / "2024-01-02T00-00-00-project.yaml"  # the newest start's merge
    assert [p.name for p in last.configs] == ["2024-01-01T00-00-00-lightning.yaml", "2024-01-01T00-00-00-project.yaml",
                                              "2024-01-02T00-00-00-lightning.yaml", "2024-01-02T00-00-00-project.yaml"]
    # the recorded best (not the newest epoch file), found in this folder although recorded elsewhere
    assert resolve_run_folder(logdir, "best").checkpoint == logdir / "checkpoints" / "epoch=000001.ckpt"
    assert resolve_run_folder(str(logdir), checkpoint="last") == last


def test_a_checkpoint_file_names_its_run(tmp_path):
    logdir = fake_run(tmp_path)
    ckpt = logdir / "checkpoints" / "epoch=000002.ckpt"
    run = resolve_run_folder(ckpt)
    assert run.logdir == logdir and run.checkpoint == ckpt and run.config.name.startswith("2024-01-02")
    nested = logdir / "checkpoints" / "trainstep_checkpoints" / "epoch=000000-step=000000010.ckpt"
    nested.parent.mkdir()
    nested.write_bytes(b"")
    assert run_folder_of_checkpoint(nested) == logdir
    assert run_folder_of_checkpoint(tmp_path / "a" / "checkpoints" / "model.ckpt") == tmp_path / "a"
    assert run_folder_of_checkpoint(tmp_path / "a" / "b" / "model.ckpt") == tmp_path / "a"  # as -r always did
    with pytest.raises(RunFolderError, match="only together with a run folder"):
        resolve_run_folder(ckpt, checkpoint="best")


def test_not_a_run_names_what_is_missing(tmp_path):
    with pytest.raises(RunFolderError, match="no such run folder or checkpoint: .*nowhere"):
        resolve_run_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunFolderError, match=r"no configs/\*-project.yaml and no checkpoints/last.ckpt"):
        resolve_run_folder(empty)
    only_configs = fake_run(tmp_path, "only_configs")
    (only_configs / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(RunFolderError, match=r"it has no checkpoints/last.ckpt \("):
        resolve_run_folder(only_configs)
    only_ckpt = fake_run(tmp_path, "only_ckpt")
    shutil.rmtree(only_ckpt / "configs")
    with pytest.raises(RunFolderError, match=r"it has no configs/\*-project.yaml \("):
        resolve_run_folder(only_ckpt)
    with pytest.raises(RunFolderError, match="no merged config"):  # a checkpoint whose run has no config
        resolve_run_folder(only_ckpt / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="unknown checkpoint 'newest'; choose one of 'last', 'best'"):
        resolve_run_folder(fake_run(tmp_path, "ok"), "newest")


def test_near_misses_get_a_hint(tmp_path):
    logs = tmp_path / "logs"
    fake_run(logs, "2024-01-01T00-00-00_a")
    newest = fake_run(logs, "2024-02-01T00-00-00_b")
    with pytest.raises(RunFolderError, match=f"holds 2 run folder.*newest is {newest}"):
        resolve_run_folder(logs)
    with pytest.raises(RunFolderError, match=f"inside the run folder {newest};"):
        resolve_run_folder(newest / "configs")


def test_best_needs_a_monitored_metric_and_its_file(tmp_path):
    unmonitored = fake_run(tmp_path, "unmonitored", best=None, monitor=None)
    with pytest.raises(RunFolderError, match="monitored no metric.*use the last checkpoint"):
        resolve_run_folder(unmonitored, "best")
    gone = fake_run(tmp_path, "gone")
    (gone / "checkpoints" / "epoch=000001.ckpt").unlink()
    with pytest.raises(RunFolderError, match=r"best checkpoint on val/loss_simple_ema \(epoch=000001.ckpt, "
                                             r"score 0.25\) is missing"):
        best_checkpoint(gone)


def test_main_py_resume_reads_the_same_folder(tmp_path):
    """``main.py -r`` (ldm.cli.resolve_run) and this module agree on a run's checkpoint and saved configs."""
    logdir = fake_run(tmp_path)
    opt = argparse.Namespace(name="", resume=str(logdir), base=["extra.yaml"], postfix="", logdir="logs")
    resumed = resolve_run(opt, "NOW")
    assert (resumed.logdir, resumed.resume_ckpt) == locate_checkpoint(logdir)
    assert resumed.base == [str(p) for p in saved_configs(logdir)] + ["extra.yaml"]
    ckpt = logdir / "checkpoints" / "epoch=000000.ckpt"
    opt.resume = str(ckpt)
    assert (resolve_run(opt, "NOW").logdir, ckpt) == locate_checkpoint(ckpt)
    with pytest.raises(RunFolderError, match="no checkpoint .*last.ckpt"):
        locate_checkpoint(tmp_path)


def _sample_diffusion(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("script_sample_diffusion", REPO / "scripts" / "sample_diffusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _model_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, config="default.yaml", ckpt="default.ckpt")
    return parser.parse_args(list(argv))


def test_run_argument_names_the_model_files(tmp_path):
    """--run gives the run's newest merged config and its last or best checkpoint; --config/--ckpt (or the
    script's defaults) still work; mixing both or a folder that is not a run fails naming the problem."""
    logdir = fake_run(tmp_path)
    newest = logdir / "configs" / "2024-01-02T00-00-00-project.yaml"
    assert model_files(_model_args("--run", str(logdir))) == (newest, logdir / "checkpoints" / "last.ckpt")
    best = model_files(_model_args("--run", str(logdir), "--run_checkpoint", "best"))
    assert best == (newest, logdir / "checkpoints" / "epoch=000001.ckpt")
    epoch0 = logdir / "checkpoints" / "epoch=000000.ckpt"
    assert model_files(_model_args("--run", str(epoch0))) == (newest, epoch0)
    opt = _model_args("--config", "a.yaml", "--ckpt", "b.ckpt")
    assert model_files(opt) == (Path("a.yaml"), Path("b.ckpt")) and opt.config == "a.yaml"
    assert model_files(_model_args()) == (Path("default.yaml"), Path("default.ckpt"))
    with pytest.raises(ValueError, match="leave out --config/--ckpt"):
        model_files(_model_args("--run", str(logdir), "--ckpt", "b.ckpt"))
    with pytest.raises(RunFolderError, match="not a main.py run folder.*holds 1 run folder"):
        model_files(_model_args("--run", str(tmp_path)))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, config=None, ckpt=None)
    with pytest.raises(ValueError, match="--run <main.py run folder>, or both --config and --ckpt"):
        model_files(parser.parse_args(["--config", "a.yaml"]))


def test_sampling_script_with_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--run", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"error: {tmp_path} is not a main.py run folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def _val_losses(logdir: Path) -> dict[int, float]:
    """Validation loss per epoch from the run's CSV log (what the checkpoint callback ranked)."""
    with open(logdir / "csv" / "version_0" / "metrics.csv") as f:
        return {int(r["epoch"]): float(r[MONITOR]) for r in csv.DictReader(f) if r.get(MONITOR)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_main_py_run_resolves_and_its_checkpoints_fit_its_config(tmp_path):
    from ldm.inference import load_model
    from ldm.train import main

    # 4 epochs of 2 steps, validated after each: last.ckpt plus the top 3 epochs on val/loss_simple_ema
    args = ["--base", str(CONFIGS / "ldm-stage2.yaml"), "-t", "-l", str(tmp_path), "-s", "3",
            "data.params.train.params.length=8", "lightning.trainer.max_steps=8",
            "lightning.trainer.val_check_interval=1.0", "lightning.trainer.check_val_every_n_epoch=1",
            "lightning.trainer.enable_progress_bar=false", "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    main(args)
    (logdir,) = tmp_path.iterdir()
    run = resolve_run_folder(logdir)
    assert run.checkpoint == logdir / "checkpoints" / "last.ckpt" and run.config.name.endswith("-project.yaml")
    model = load_model(run.config, run.checkpoint, device="cpu", strict=True)  # config and weights belong together
    assert model.num_timesteps == 50 and model.channels == 2

    losses = _val_losses(logdir)
    assert sorted(losses) == [0, 1, 2, 3]
    best = resolve_run_folder(logdir, "best").checkpoint
    assert best == logdir / "checkpoints" / f"epoch={min(losses, key=losses.get):06}.ckpt"
    assert len(list((logdir / "checkpoints").glob("epoch=*.ckpt"))) == 3
    assert load_checkpoint(best)["epoch"] == min(losses, key=losses.get)

    # a sampling script given --run samples exactly what --config/--ckpt of the same files sample
    def sampled(*model_args: str) -> np.ndarray:
        out = tmp_path / "samples" / "-".join(a.rsplit("/", 1)[-1] for a in model_args)
        _sample_diffusion([*model_args, "--classes", "1", "--n_samples", "2", "--ddim_steps", "3", "--npz",
                           "--outdir", str(out), "--device", "cpu"])
        return np.load(out / "samples.npz")["arr_0"]

    by_files = sampled("--config", str(run.config), "--ckpt", str(run.checkpoint))
    np.testing.assert_array_equal(sampled("--run", str(logdir)), by_files)
    by_best = sampled("--config", str(run.config), "--ckpt", str(best))
    np.testing.assert_array_equal(sampled("--run", str(logdir), "--run_checkpoint", "best"), by_best)
    assert not np.array_equal(by_best, by_files)  # the two checkpoints differ, and --run_checkpoint chose

    # main.py -r continues the same folder; the resolver then gives the newer merged config and last state
    main(["-r", str(logdir), "-t", "lightning.trainer.max_steps=10", "lightning.trainer.enable_progress_bar=false"])
    resumed = resolve_run_folder(logdir)
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 2 and resumed.config != run.config
    assert resumed.config == max((logdir / "configs").glob("*-project.yaml"))
    assert load_checkpoint(resumed.checkpoint)["global_step"] == 10
