"""scripts/evaluate.py end to end: sample metrics on folders in a subprocess, reconstruction metrics in-process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from ldm.evaluation import BUNDLED_NAME
from ldm.evaluation.features import FeatureStats
from ldm.evaluation.kid import kid
from ldm.evaluation.reconstruction import psnr, reconstruct, ssim

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"


def _photos32() -> np.ndarray:
    base = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC))
                     for im in (skdata.astronaut(), skdata.coffee(), skdata.chelsea())])
    return np.concatenate([base, base[:, :, ::-1]])  # 6 images


def test_evaluate_script_on_two_folders(tmp_path):
    photos = _photos32()
    ref, samples = tmp_path / "ref", tmp_path / "samples"
    ref.mkdir()
    samples.mkdir()
    for i, im in enumerate(photos):
        Image.fromarray(im).save(ref / f"{i:02d}.png")
        Image.fromarray(im).save(samples / f"{i:02d}.bmp")
    (samples / "zz_corrupt.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "res.json"
    stats = tmp_path / "ref_stats.npz"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--samples", str(samples), "--reference", str(ref), "--metrics",
         "fid,kid,is,pr", "--extractor", "bundled", "--device", "cpu", "--batch-size", "6", "--kid-subsets", "4",
         "--kid-subset-size", "5", "--is-splits", "2", "--json", str(out), "--save-stats", str(stats),
         "--cache-dir", str(tmp_path / "cache"), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["extractor"] == BUNDLED_NAME
    assert res["n_samples"] == 6 and res["n_samples_skipped"] == 1 and res["n_reference"] == 6
    # Lossless copies of the reference (another file format): FID 0, every sample inside the reference manifold.
    assert abs(res["fid"]) < 1e-3
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["is_mean"] is None and "standard" in res["is_unavailable"]
    for label in ("FID", "KID (mean)", "Precision", "Recall"):
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith(label + ":"))
        assert BUNDLED_NAME in line
    saved = FeatureStats.load(stats)
    assert saved.extractor == BUNDLED_NAME and saved.features.shape == (6, 2048)
    assert len(list((tmp_path / "cache").glob("ref-stats-*.npz"))) == 1
    # Samples equal the reference here, so the script's KID is the library's KID of the saved features.
    assert res["kid_mean"] == pytest.approx(kid(saved.features, saved.features, subsets=4, subset_size=5)[0],
                                            rel=1e-4)


@pytest.fixture
def _script_module(monkeypatch):
    """Makes scripts/evaluate.py importable as `scripts_evaluate` for in-process calls."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scripts_evaluate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "scripts_evaluate", module)
    return module


def test_parse_args_rejects_incomplete_invocations(_script_module, capsys):
    with pytest.raises(SystemExit):
        _script_module.parse_args(["--samples", "x"])
    assert "--reference" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script_module.parse_args(["--first-stage-config", "a.yaml"])
    assert "--data-config" in capsys.readouterr().err
    from ldm.evaluation.evaluate import Metric
    with pytest.raises(ValueError, match="fid, kid, is, pr"):
        Metric.parse("fid,fdi")


def test_evaluate_script_reconstruction_mode(tmp_path, _script_module):
    from safetensors.torch import save_file

    from ldm.models.autoencoder import AutoencoderKL

    dd = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model_cfg = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                           "params": {"ddconfig": dd, "embed_dim": 3, "lossconfig": {
                               "target": "ldm.modules.losses.LPIPSWithDiscriminator",
                               "params": {"disc_start": 1}}}}}
    data_cfg = {"data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4, "validation": {
        "target": "ldm.data.emoji.EmojiDataset",
        "params": {"size": 32, "split": "validation", "max_classes": 3, "length": 6}}}}}
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(model_cfg))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data_cfg))
    torch.manual_seed(0)
    ae = AutoencoderKL(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, embed_dim=3).eval()
    save_file(ae.state_dict(), str(tmp_path / "ae.safetensors"))
    res = _script_module.main(["--first-stage-config", str(tmp_path / "ae.yaml"), "--first-stage-ckpt",
                               str(tmp_path / "ae.safetensors"), "--data-config", str(tmp_path / "data.yaml"),
                               "--batch-size", "4", "--no-rfid", "--no-lpips", "--device", "cpu",
                               "--json", str(tmp_path / "r.json"), "--quiet"])
    assert json.loads((tmp_path / "r.json").read_text()) == res
    assert res["n_images"] == 6 and res["rfid"] is None and res["lpips"] is None
    # The same numbers computed by hand from the checkpoint's model.
    from ldm.data.emoji import EmojiDataset

    ds = EmojiDataset(size=32, split="validation", max_classes=3, length=6)
    x = torch.from_numpy(np.stack([ds[i]["image"] for i in range(6)])).permute(0, 3, 1, 2)
    rec = reconstruct(ae, x).clamp(-1, 1)
    assert res["psnr"] == pytest.approx(psnr((rec + 1) / 2, (x + 1) / 2).mean().item(), rel=1e-5)
    assert res["ssim"] == pytest.approx(ssim((rec + 1) / 2, (x + 1) / 2).mean().item(), rel=1e-5)
