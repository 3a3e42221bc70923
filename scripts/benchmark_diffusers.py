"""The diffusers networks with the architecture of a config's UNet and first stage, for ``benchmark.py --vs diffusers``.

diffusers is a benchmark extra (``pip install -e ".[benchmark]"``), never needed to train or sample. Each builder
checks that the parameter count equals ours, so the two sides of a benchmark run the same architecture.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn


class Unsupported(ValueError):
    """A config whose network has no diffusers counterpart of the same architecture."""


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ImportError("--vs diffusers needs diffusers: pip install -e \".[benchmark]\"") from None
    return diffusers


def unet_kwargs(p: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments equivalent to the ``UNetModel`` arguments `p` (cross-attention UNets)."""
    if not p.get("use_spatial_transformer", False):
        raise Unsupported("only UNets with SpatialTransformer (use_spatial_transformer: true) have a diffusers "
                          "UNet2DConditionModel of the same architecture")
    for key in ("use_scale_shift_norm", "resblock_updown", "n_embed"):
        if p.get(key):
            raise Unsupported(f"unet_config.params.{key} has no diffusers UNet2DConditionModel counterpart")
    if p.get("dims", 2) != 2:
        raise Unsupported("only 2-D UNets")
    mc = int(p["model_channels"])
    channels = [mc * int(m) for m in p.get("channel_mult", (1, 2, 4, 8))]
    attention = [2 ** level in set(p["attention_resolutions"]) for level in range(len(channels))]
    head_channels = int(p.get("num_head_channels", -1))
    heads = [ch // head_channels if head_channels != -1 else int(p.get("num_heads", -1)) for ch in channels]
    return dict(
        sample_size=int(p["image_size"]), in_channels=int(p["in_channels"]), out_channels=int(p["out_channels"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(channels), layers_per_block=int(p["num_res_blocks"]),
        cross_attention_dim=int(p["context_dim"]), attention_head_dim=tuple(heads),
        transformer_layers_per_block=int(p.get("transformer_depth", 1)),
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
        num_class_embeds=p.get("num_classes"), dropout=float(p.get("dropout", 0.0)), norm_eps=1e-5)


def build_unet(p: Mapping[str, Any], expected_params: int) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """(diffusers UNet2DConditionModel, call(x, t, context, y) -> [N x C x H x W]) with the architecture of `p`."""
    unet = _diffusers().UNet2DConditionModel(**unet_kwargs(p))
    _check_params("UNet", unet, expected_params)

    def call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=context, class_labels=y).sample

    return unet, call


def autoencoder_kwargs(target: str, p: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL`` / ``VQModel`` arguments equivalent to our first stage `target` with params `p`."""
    dd = p["ddconfig"]
    if list(dd.get("attn_resolutions", [])):
        raise Unsupported("first stages with attention inside the levels (ddconfig.attn_resolutions) have no "
                          "diffusers counterpart")
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("use_linear_attn", False):
        raise Unsupported("only first stages with vanilla attention")
    levels = len(dd.get("ch_mult", (1, 2, 4, 8)))
    common = dict(in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]),
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(int(dd["ch"]) * int(m) for m in dd.get("ch_mult", (1, 2, 4, 8))),
                  layers_per_block=int(dd["num_res_blocks"]), latent_channels=int(dd["z_channels"]),
                  sample_size=int(dd["resolution"]), norm_num_groups=32)
    if target.endswith("AutoencoderKL"):
        if int(p["embed_dim"]) != int(dd["z_channels"]):
            raise Unsupported("diffusers' AutoencoderKL needs embed_dim == z_channels")
        return common
    if target.endswith(("VQModelInterface", "VQModel")):
        return dict(common, num_vq_embeddings=int(p["n_embed"]), vq_embed_dim=int(p["embed_dim"]))
    raise Unsupported(f"first stage {target} has no diffusers counterpart")


Coder = Callable[[torch.Tensor], torch.Tensor]


def build_autoencoder(target: str, p: Mapping[str, Any], expected_params: int) -> tuple[nn.Module, Coder, Coder]:
    """(model, encode(images) -> latents, decode(latents) -> images) of the diffusers first stage like ours."""
    kwargs = autoencoder_kwargs(target, p)
    diffusers = _diffusers()
    if "num_vq_embeddings" in kwargs:
        model = diffusers.VQModel(**kwargs)
        encode = lambda x: model.encode(x).latents  # noqa: E731 (pre-quantisation, as VQModelInterface.encode)
    else:
        model = diffusers.AutoencoderKL(**kwargs)
        encode = lambda x: model.encode(x).latent_dist.sample()  # noqa: E731
    _check_params("first stage", model, expected_params)
    return model, encode, lambda z: model.decode(z).sample


def _check_params(what: str, model: nn.Module, expected: int) -> None:
    n = sum(p.numel() for p in model.parameters())
    if n != expected:
        raise Unsupported(f"the diffusers {what} has {n} parameters, ours {expected}: not the same architecture")
