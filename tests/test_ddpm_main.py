"""main.py trains stage two on the latents of a stage-one checkpoint written by main.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import load_checkpoint

CONFIGS = Path(__file__).parent / "configs"
QUIET = ["lightning.trainer.enable_progress_bar=false"]


def only_run(logs: Path) -> Path:
    runs = [d for d in logs.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_trains_stage_two_on_a_stage_one_checkpoint(tmp_path):
    from ldm.train import main

    torch.manual_seed(0)
    main(["--base", str(CONFIGS / "ldm-stage1.yaml"), "-t", "-l", str(tmp_path / "ae"), "-s", "1", *QUIET])
    ae_ckpt = only_run(tmp_path / "ae") / "checkpoints" / "last.ckpt"
    ae_sd = load_checkpoint(ae_ckpt)["state_dict"]
    assert any(k.startswith("loss.") for k in ae_sd)  # the stage-one checkpoint carries its discriminator

    main(["--base", str(CONFIGS / "ldm-stage2.yaml"), "-t", "-l", str(tmp_path / "ldm"), "-s", "2",
          f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}", *QUIET])
    logdir = only_run(tmp_path / "ldm")
    ckpt = load_checkpoint(logdir / "checkpoints" / "last.ckpt")
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 3
    # the frozen first stage is stage one's trained weights, unchanged by stage-two training
    encoder_keys = [k for k in ae_sd if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))]
    assert encoder_keys
    for k in encoder_keys:
        torch.testing.assert_close(sd["first_stage_model." + k], ae_sd[k], msg=k)
    assert not any(k.startswith("first_stage_model.loss.") for k in sd)
    # scale_by_std set scale_factor from the first batch and the checkpoint keeps it
    scale = sd["scale_factor"].item()
    assert scale != 1.0 and 0.01 < scale < 100.0
    # EMA shadows with the original names, and the trainable conditioner
    assert sd["model_ema.num_updates"].item() == 3
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd and "cond_stage_model.embedding.weight" in sd
    # the image logger wrote samples and guided samples
    images = {p.name.split("_gs-")[0] for p in (logdir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstruction", "samples", "samples_cfg_scale_2.00", "diffusion_row"} <= images, images
