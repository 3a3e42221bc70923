"""Pre-emption signals and SIGKILL during a save, on a real training subprocess.

The subprocess is the toy training script of tests/test_reliability_resume.py (a tiny Lightning model that
saves last.ckpt every 2 steps through AtomicCheckpointIO and has a PreemptionCheckpoint).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real training subprocesses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "test_reliability_resume.py"
MAX_STEPS = 100_000
TIMEOUT = 180.0


def _start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(workdir / "log.txt", "w")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(workdir), str(MAX_STEPS), *extra],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, what: str, workdir: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}) waiting for {what}:\n"
                        + (workdir / "log.txt").read_text()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _step(workdir: Path) -> int:
    try:
        return int((workdir / "checkpoints" / "STEP").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


CASES = ("SIGTERM", "SIGUSR1", "SIGKILL")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training subprocess per case, all started at once so that their (slow) start-ups overlap."""
    procs = {}
    for case in CASES:
        workdir = tmp_path_factory.mktemp(case)
        procs[case] = (_start(workdir, *(["--slow-save", "600"] if case == "SIGKILL" else [])), workdir)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_resumable_checkpoint_and_exits_cleanly(runs, name):
    proc, tmp_path = runs[name]
    signum = getattr(signal, name)
    _wait_for(lambda: _step(tmp_path) >= 5, proc, "5 training steps", tmp_path)
    proc.send_signal(signum)
    rc = proc.wait(timeout=TIMEOUT)
    log = (tmp_path / "log.txt").read_text()
    assert rc == 0, log[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    finished = int((tmp_path / "FINISHED").read_text())
    assert 5 <= ckpt["global_step"] == finished < MAX_STEPS  # saved at the step where it stopped
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["loops"]  # resumable, not weights only
    assert f"received {name}" in log


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(runs):
    proc, tmp_path = runs["SIGKILL"]
    saving = tmp_path / "checkpoints" / "SAVING"
    _wait_for(saving.exists, proc, "a save in progress", tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    tmp, step = saving.read_text().split("\n")
    assert Path(tmp).exists() and Path(tmp).parent == tmp_path / "checkpoints"  # killed between write and rename
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == int(step) - 2  # the save before the interrupted one (saves every 2 steps)
