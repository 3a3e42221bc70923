"""Real training runs of the toy model through main.py: log layout, checkpoints, image grids, resuming."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import load_checkpoint
from ldm.train import main
from tests.helpers.toy import read_steps

TOY = Path(__file__).parent / "helpers" / "toy.yaml"
QUIET = ["lightning.trainer.enable_progress_bar=false"]


def _run_main(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _only_run(logs: Path) -> Path:
    runs = [d for d in logs.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_train_then_resume_through_the_command_line(tmp_path, repo_root):
    logs, steps = tmp_path / "logs", tmp_path / "steps.txt"
    _run_main(["--base", str(TOY), "-t", "-l", str(logs), f"model.params.step_log={steps}",
               "lightning.trainer.max_steps=6"], repo_root)
    logdir = _only_run(logs)
    assert logdir.name.endswith("_toy")
    assert {"checkpoints", "configs", "images"} <= {p.name for p in logdir.iterdir()}

    saved = sorted((logdir / "configs").glob("*-project.yaml"))
    assert len(saved) == 1
    project = OmegaConf.load(saved[0])
    assert project.model.target == "tests.helpers.toy.ToyModel" and project.model.params.step_log == str(steps)
    assert "lightning" not in project
    lightning = OmegaConf.load(next((logdir / "configs").glob("*-lightning.yaml")))
    assert lightning.lightning.trainer.max_steps == 6

    first = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 6 and read_steps(steps) == list(range(6))
    # --scale_lr defaults on: 1 (accumulate) * 1 (device) * 4 (batch) * 1e-3 (base)
    assert first["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(4e-3)

    grids = sorted((logdir / "images" / "train").glob("reconstructions_gs-*.png"))
    assert [g.name.split("_")[1] for g in grids] == ["gs-000002", "gs-000004", "gs-000006"]
    grid = np.asarray(Image.open(grids[0]))
    assert grid.dtype == np.uint8 and grid.shape == (2 + (8 + 2), 2 + 4 * (8 + 2), 3)  # one row of 4 images

    _run_main(["-r", str(logdir), "-t", "lightning.trainer.max_steps=10"], repo_root)
    assert _only_run(logs) == logdir
    assert read_steps(steps) == list(range(10))  # the resumed run went on at step 6
    resumed = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 10
    assert not torch.equal(resumed["state_dict"]["net.weight"], first["state_dict"]["net.weight"])
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 2


def test_manual_optimisation_model_resumes_from_its_checkpoint(tmp_path):
    logs, steps = tmp_path / "logs", tmp_path / "steps.txt"
    args = ["--base", str(TOY), "-l", str(logs), "model.params.manual=true", f"model.params.step_log={steps}",
            *QUIET]
    main([*args[:2], "-t", *args[2:], "lightning.trainer.max_steps=8"])
    logdir = _only_run(logs)
    first = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert len(first["optimizer_states"]) == 2 and first["global_step"] == 8  # two optimiser steps per batch
    batches_before = len(read_steps(steps))
    main(["-r", str(logdir), "-t", "lightning.trainer.max_steps=12", *QUIET])
    seen = read_steps(steps)
    assert seen[batches_before] == first["global_step"]  # continued where the checkpoint left off
    assert load_checkpoint(logdir / "checkpoints" / "last.ckpt")["global_step"] == 12


def test_crash_writes_last_checkpoint_and_resume_continues_there(tmp_path):
    logs, steps = tmp_path / "logs", tmp_path / "steps.txt"
    with pytest.raises(RuntimeError, match="toy failure at step 3"):
        main(["--base", str(TOY), "-t", "-l", str(logs), "model.params.fail_at_step=3",
              f"model.params.step_log={steps}", "lightning.trainer.max_steps=20", *QUIET])
    logdir = _only_run(logs)
    # the first regular checkpoint would come at the end of epoch 0 (step 4): this one is the emergency save
    assert [p.name for p in (logdir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert load_checkpoint(logdir / "checkpoints" / "last.ckpt")["global_step"] == 3
    main(["-r", str(logdir), "-t", "model.params.fail_at_step=null", "lightning.trainer.max_steps=5", *QUIET])
    assert read_steps(steps) == [0, 1, 2, 3, 3, 4]
    assert load_checkpoint(logdir / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_scale_lr_false_uses_base_learning_rate_and_test_split_runs(tmp_path):
    logs = tmp_path / "logs"
    main(["--base", str(TOY), "-t", "-l", str(logs), "--scale_lr", "False", "-n", "plain",
          "data.params.test.target=tests.helpers.toy.ToyDataset", "data.params.test.params.size=4",
          "lightning.trainer.max_steps=2", *QUIET])
    logdir = _only_run(logs)
    assert logdir.name.endswith("_plain")
    ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    metrics = (next((logdir / "csv").rglob("metrics.csv"))).read_text()
    assert "test/loss" in metrics and "lr-SGD" in metrics


def test_config_error_names_the_file_and_key(tmp_path):
    with pytest.raises(Exception) as e:
        main(["--base", str(TOY), "-l", str(tmp_path), "model.params.chanels=3", *QUIET])
    assert "params.chanels" in str(e.value) and "'channels'" in str(e.value) and str(TOY) in str(e.value)


def test_debug_run_that_fails_is_moved_to_debug_runs(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(RuntimeError, match="toy failure"):
        main(["--base", str(TOY), "-t", "-d", "-l", str(logs), "-n", "dbg", "model.params.fail_at_step=2",
              "lightning.trainer.max_steps=5", *QUIET])
    moved = list((logs / "debug_runs").iterdir())
    assert len(moved) == 1 and moved[0].name.endswith("_dbg")
    assert (moved[0] / "checkpoints" / "last.ckpt").is_file()  # the crash checkpoint travelled with it
    assert sorted(p.name for p in logs.iterdir()) == ["debug_runs"]
