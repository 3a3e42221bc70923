"""The reliability pieces wired into ``python main.py``: SIGTERM on a real run saves a resumable last.ckpt and
exits 0, ``-r`` continues from it, and a bad config fails before training starts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_checkpoint
from ldm.train import main
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "helpers" / "toy.yaml"
QUIET = ["lightning.trainer.enable_progress_bar=false"]
TIMEOUT = 240.0


def _steps(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


@pytest.mark.slow
def test_sigterm_on_main_saves_last_ckpt_exits_zero_and_resumes(tmp_path):
    logs, steps = tmp_path / "logs", tmp_path / "steps.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "main.py", "--base", str(TOY), "-t", "-l", str(logs),
                                 f"model.params.step_log={steps}", "lightning.trainer.max_steps=100000", *QUIET],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while len(_steps(steps)) < 6:
                assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "main.py did not start training in time"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "out.txt").read_text()
    assert rc == 0, output[-3000:]
    (logdir,) = [d for d in logs.iterdir() if d.is_dir()]
    ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    stopped_at = ckpt["global_step"]
    assert 6 <= stopped_at < 100000 and max(_steps(steps)) == stopped_at - 1  # saved at the step it stopped
    assert "received SIGTERM" in output

    steps.write_text("")
    main(["-r", str(logdir), "-t", f"lightning.trainer.max_steps={stopped_at + 3}", *QUIET])
    assert _steps(steps) == [stopped_at, stopped_at + 1, stopped_at + 2]
    assert load_checkpoint(logdir / "checkpoints" / "last.ckpt")["global_step"] == stopped_at + 3


@pytest.mark.parametrize("override,key", [("model.base_learning_rate=-0.001", "model.base_learning_rate"),
                                          ("data.params.batch_size=0", "data.params.batch_size")])
def test_bad_config_fails_before_training(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        main(["--base", str(TOY), "-t", "-l", str(tmp_path / "logs"), override, *QUIET])
    assert not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))


def _last(logs: Path) -> dict:
    (logdir,) = [d for d in logs.iterdir() if d.is_dir()]
    return load_checkpoint(logdir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_main_preempted_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    """12 steps (4 per epoch) straight, against SIGUSR1 during step 5 (mid-epoch) then ``-r`` for the rest."""
    common = ["--base", str(TOY), "-t", "lightning.trainer.max_steps=12", *QUIET]
    main([*common, "-l", str(tmp_path / "full")])
    main([*common, "-l", str(tmp_path / "part"), "model.params.signal_at_step=5"])
    stopped = _last(tmp_path / "part")
    assert stopped["global_step"] == 6
    epoch = stopped["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epoch["processed"] == epoch["completed"]  # saved mid-epoch, not overwritten by an epoch-end save
    (logdir,) = [d for d in (tmp_path / "part").iterdir() if d.is_dir()]
    main(["-r", str(logdir), "-t", "model.params.signal_at_step=null", *QUIET])
    full, resumed = _last(tmp_path / "full"), _last(tmp_path / "part")
    assert full["global_step"] == resumed["global_step"] == 12
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for a, b in zip(full["optimizer_states"], resumed["optimizer_states"]):
        for pa, pb in zip(a["state"].values(), b["state"].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)
