"""First-stage networks: the convolutional `Encoder` and `Decoder` of the KL and VQ autoencoders.

Parameter names follow the original CompVis code exactly (``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``,
``down.{i}.downsample.conv``, ``mid.block_1``, ``mid.attn_1``, ``mid.block_2``, ``up.{i}...``, ``norm_out``,
``conv_out``), so original checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import difflib
import enum
import functools
import inspect
import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ldm.modules.diffusionmodules.util import memory_format_of
from ldm.util import ConfigError, parse_enum

logger = logging.getLogger(__name__)


class AttentionType(str, enum.Enum):
    """The self-attention used at `attn_resolutions` and in the middle block."""

    VANILLA = "vanilla"  # softmax attention over all positions (scaled_dot_product_attention)
    LINEAR = "linear"  # linear attention (one head), as the original `LinAttnBlock`
    NONE = "none"  # no attention: identity

    @classmethod
    def parse(cls, value: str | AttentionType) -> AttentionType:
        return parse_enum(cls, value, "attn_type")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU."""
    return F.silu(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 (original name)
    """GroupNorm with 32 groups and eps 1e-6, as in the original."""
    if in_channels % num_groups:
        raise ValueError(f"GroupNorm with {num_groups} groups needs a channel count divisible by {num_groups}, "
                         f"got {in_channels} (choose `ch` as a multiple of {num_groups})")
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv: [N x C x H x W] -> [N x C x 2H x 2W]."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv after asymmetric (right/bottom) zero padding, or average pooling.

    [N x C x H x W] -> [N x C x H/2 x W/2].
    """

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice with a skip (1x1 `nin_shortcut` or 3x3 `conv_shortcut` when channels change).

    [N x in_channels x H x W] -> [N x out_channels x H x W]; `temb` ([N x temb_channels]) is added after the first
    conv when the block was built with `temb_channels > 0` (the first stage uses none).
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head softmax self-attention over the H*W positions with a residual: [N x C x H x W] -> same.

    q, k, v and the output projection are 1x1 convs (`q`, `k`, `v`, `proj_out`, as in the original);
    the attention itself runs on `scaled_dot_product_attention` with scale C^-1/2.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        b, c, h, w = x.shape
        # [N x C x H x W] -> [N x 1 x HW x C]: one head, positions as the sequence
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(h_), self.k(h_), self.v(h_)))
        out = F.scaled_dot_product_attention(q, k, v)
        # [N x 1 x HW x C] -> [N x C x H x W] is a channels-last view: give proj_out the layout of the input
        out = out.transpose(2, 3).reshape(b, c, h, w).contiguous(memory_format=memory_format_of(x))
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """Linear attention with one head of width C (the original `LinAttnBlock`): [N x C x H x W] -> same.

    Faithful to the original, it has no normalisation and no residual connection.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.heads = 1
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, c, h * w).unbind(1)  # each [N x C x HW]
        k = k.softmax(dim=-1)
        context = torch.einsum("bdn,ben->bde", k, v)
        out = torch.einsum("bde,bdn->ben", context, q)
        return self.to_out(out.reshape(b, c, h, w))


def make_attn(in_channels: int, attn_type: str | AttentionType = AttentionType.VANILLA) -> nn.Module:
    """The attention block of type `attn_type` for `in_channels` channels."""
    attn_type = AttentionType.parse(attn_type)
    logger.debug("making attention of type '%s' with %d in_channels", attn_type.value, in_channels)
    if attn_type is AttentionType.VANILLA:
        return AttnBlock(in_channels)
    if attn_type is AttentionType.LINEAR:
        return LinAttnBlock(in_channels)
    return nn.Identity()


def _resolve_attn_type(attn_type: str | AttentionType, use_linear_attn: bool) -> AttentionType:
    return AttentionType.LINEAR if use_linear_attn else AttentionType.parse(attn_type)


class Encoder(nn.Module):
    """The first-stage encoder: image [N x in_channels x H x W] -> [N x (2 if double_z else 1)*z_channels x H/f x W/f].

    f = 2^(len(ch_mult) - 1). `resolution` is the nominal input size; it only decides at which levels the
    `attn_resolutions` attention blocks sit (the network itself runs on any size divisible by f).
    `use_checkpoint` recomputes the blocks' activations in the backward pass (less memory, more compute).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str | AttentionType = AttentionType.VANILLA,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        self.use_checkpoint = use_checkpoint
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = _middle(block_in, self.temb_ch, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = functools.partial(_run, self.use_checkpoint)
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = run(down.block[i_block], h)
                if len(down.attn) > 0:
                    h = run(down.attn[i_block], h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = run(self.mid.block_2, run(self.mid.attn_1, run(self.mid.block_1, h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """The first-stage decoder: [N x z_channels x h x w] -> image [N x out_ch x h*f x w*f], f = 2^(len(ch_mult)-1).

    :param give_pre_end: return the features before `norm_out`/`conv_out` ([N x ch*ch_mult[0] x H x W]).
    :param tanh_out: squash the output with tanh.
    :param use_checkpoint: recompute the blocks' activations in the backward pass (less memory, more compute).
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 resolution: int, z_channels: int, give_pre_end: bool = False, tanh_out: bool = False,
                 use_linear_attn: bool = False, attn_type: str | AttentionType = AttentionType.VANILLA,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        attn_type = _resolve_attn_type(attn_type, use_linear_attn)
        self.use_checkpoint = use_checkpoint
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.debug("decoder works with z of shape %s", self.z_shape)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(block_in, self.temb_ch, dropout, attn_type)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # up[i] is the level of resolution resolution / 2^i

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last_z_shape = z.shape
        run = functools.partial(_run, self.use_checkpoint)
        h = self.conv_in(z)
        h = run(self.mid.block_2, run(self.mid.attn_1, run(self.mid.block_1, h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = run(up.block[i_block], h)
                if len(up.attn) > 0:
                    h = run(up.attn[i_block], h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


def _run(use_checkpoint: bool, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Applies a ResnetBlock or attention block, recomputing its activations in the backward pass (activation
    checkpointing) when `use_checkpoint` and gradients are on."""
    if use_checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
    return block(h)


def _middle(channels: int, temb_channels: int, dropout: float, attn_type: AttentionType) -> nn.Module:
    """The middle block `mid.block_1`, `mid.attn_1`, `mid.block_2` at the lowest resolution."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                              dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels,
                              dropout=dropout)
    return mid


def _arguments(cls: type) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n != "self"}


def split_ddconfig(ddconfig: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a shared `ddconfig` (as in the original YAMLs) into the keyword arguments of Encoder and Decoder.

    :raises ConfigError: naming any key that neither network accepts, and any missing required key.
    """
    enc_args, dec_args = _arguments(Encoder), _arguments(Decoder)
    known = enc_args | dec_args
    unknown = [k for k in ddconfig if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=2, cutoff=0.6)
            hints.append(f"'ddconfig.{key}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in ddconfig: {', '.join(hints)}. Valid keys: {', '.join(sorted(known))}")
    required = {"ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels", "out_ch"}
    missing = sorted(required - set(ddconfig))
    if missing:
        raise ConfigError(f"ddconfig is missing required key(s): {', '.join(missing)}")
    enc = {k: v for k, v in ddconfig.items() if k in enc_args}
    dec = {k: v for k, v in ddconfig.items() if k in dec_args}
    return enc, dec


def downsampling_factor(ddconfig: Mapping[str, Any]) -> int:
    """f = 2^(len(ch_mult) - 1): how much the encoder shrinks each spatial side."""
    return 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 8))) - 1)
