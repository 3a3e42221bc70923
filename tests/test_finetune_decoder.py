"""adapt_decoder: a first stage's decoder learns to reconstruct images it rendered badly while the encoder (the
latent space a trained LDM lives in) stays bit-identical."""
from __future__ import annotations

import pytest
import torch

from ldm.finetune.decoder import adapt_decoder
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.first_stage import freeze


def tiny_first_stage() -> AutoencoderKL:
    torch.manual_seed(0)
    dd = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    model = AutoencoderKL(ddconfig=dd, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    with torch.no_grad():  # a small posterior variance, as a trained KL autoencoder has
        model.quant_conv.weight[4:].zero_()
        model.quant_conv.bias[4:].fill_(-10.0)
    return freeze(model)


def images(n: int = 6) -> torch.Tensor:
    """[n x 3 x 16 x 16] smooth colour patterns in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


@torch.no_grad()
def reconstruction_error(first_stage: AutoencoderKL, x: torch.Tensor) -> float:
    return (first_stage.decode(first_stage.encode(x).mode()) - x).abs().mean().item()


def test_adapt_decoder_learns_the_images_and_keeps_the_encoder():
    first_stage, x = tiny_first_stage(), images()
    before = {k: v.clone() for k, v in first_stage.state_dict().items()}
    error_before = reconstruction_error(first_stage, x)
    losses = adapt_decoder(first_stage, x, steps=60, lr=3e-3, batch_size=8)
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert reconstruction_error(first_stage, x) < 0.5 * error_before
    after = first_stage.state_dict()
    for k, v in before.items():
        if k.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(after[k], v), k  # the latent space is untouched
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("decoder."))
    assert not first_stage.training and not any(p.requires_grad for p in first_stage.parameters())
    first_stage.train()  # still frozen: freeze() disabled train(), and adapt_decoder did not undo it
    assert not first_stage.training


def test_adapt_decoder_names_a_missing_part():
    with pytest.raises(AttributeError, match="no submodule.*post_quant_convs"):
        adapt_decoder(tiny_first_stage(), images(), steps=1, parts=("decoder", "post_quant_convs"))
