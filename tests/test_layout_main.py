"""A layout-to-image LDM (coordinates_bbox tokens -> BERTEmbedder -> cross-attention) trains through main.py."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_checkpoint, load_weights
from ldm.data.coco_layout import CocoLayoutDataset
from ldm.data.emoji_layout import make_emoji_layout_set
from ldm.util import instantiate_from_config

CONFIG = Path(__file__).parent / "configs" / "layout2img-tiny.yaml"
TOKEN_EMBEDDING = "cond_stage_model.transformer.token_emb.weight"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_layout_model_trains_through_main(tmp_path, repo_root):
    train = make_emoji_layout_set(tmp_path / "train", num_images=64, size=32, seed=0)
    val = make_emoji_layout_set(tmp_path / "val", num_images=8, size=32, seed=1)
    logs = tmp_path / "logs"
    data = "data.params"
    args = [f"{data}.train.params.annotation_file={train}", f"{data}.train.params.image_root={train.parent}",
            f"{data}.validation.params.annotation_file={val}", f"{data}.validation.params.image_root={val.parent}"]
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "main.py", "--base", str(CONFIG), "-t", "-l", str(logs), "-s", "0", *args],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (logdir,) = [d for d in logs.iterdir() if d.is_dir()]

    (metrics,) = logdir.glob("csv/*/metrics.csv")
    with open(metrics) as f:
        losses = [float(r["train/loss_simple_step"]) for r in csv.DictReader(f) if r.get("train/loss_simple_step")]
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)

    # the conditioner is trained: the embeddings of the tokens the layouts use move between steps 10 and 40,
    # those of tokens no layout uses stay (up to AdamW's weight decay, a common factor)
    step10 = load_checkpoint(next((logdir / "checkpoints" / "trainstep_checkpoints").glob("*step=000000010*")))
    last_ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    assert last_ckpt["global_step"] == 40
    before, after = step10["state_dict"][TOKEN_EMBEDDING], last_ckpt["state_dict"][TOKEN_EMBEDDING]
    dataset = CocoLayoutDataset(train, train.parent, size=32, max_objects=3)
    used = torch.unique(torch.stack([dataset[i]["coordinates_bbox"] for i in range(len(dataset))]))
    unused = torch.ones(before.shape[0], dtype=torch.bool)
    unused[used] = False
    change = (after - before).norm(dim=1) / before.norm(dim=1)
    assert change[used].min() > 10 * change[unused].max(), (change[used].min(), change[unused].max())

    # the checkpoint reloads strictly into the model its saved config builds
    project = OmegaConf.load(next((logdir / "configs").glob("*-project.yaml")))
    model = instantiate_from_config(project.model)
    load_weights(model, last_ckpt["state_dict"], strict=True)
    torch.testing.assert_close(model.cond_stage_model.transformer.token_emb.weight, after)
    assert any(p.name.startswith("samples_") for p in (logdir / "images" / "train").glob("*.png"))
