"""Cross-attention, feed-forward and the spatial transformer against plain reference formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_cross_attention(attn: CrossAttention, x, context, mask=None):
    """The original's einsum formulation: per head softmax(q k^T / sqrt(d)) v, masked keys at -max."""
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (t.reshape(b, -1, h, d).permute(0, 2, 1, 3) for t in (q, k, v))
    sim = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    out = sim.softmax(-1) @ v
    return attn.to_out(out.permute(0, 2, 1, 3).reshape(b, n, inner))


def test_cross_attention_equals_plain_softmax_attention():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=16, context_dim=12, heads=4, dim_head=8).eval()
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 5, 12)
    assert torch.allclose(attn(x, ctx), naive_cross_attention(attn, x, ctx), atol=1e-5)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    assert torch.allclose(attn(x, ctx, mask=mask), naive_cross_attention(attn, x, ctx, mask), atol=1e-5)
    # a masked key has no influence at all
    ctx2 = ctx.clone()
    ctx2[0, 2] += 10.0
    assert torch.allclose(attn(x, ctx, mask=mask), attn(x, ctx2, mask=mask), atol=1e-6)
    # without a context it is self-attention
    self_attn = CrossAttention(query_dim=16, heads=2, dim_head=8).eval()
    assert torch.allclose(self_attn(x), naive_cross_attention(self_attn, x, x), atol=1e-5)
    with pytest.raises(ValueError, match="context of width 12"):
        attn(x)  # a cross-attention layer called without its context


def test_cross_attention_parameter_names():
    names = {k: tuple(v.shape) for k, v in CrossAttention(16, 12, heads=2, dim_head=8).state_dict().items()}
    assert names == {"to_q.weight": (16, 16), "to_k.weight": (16, 12), "to_v.weight": (16, 12),
                     "to_out.0.weight": (16, 16), "to_out.0.bias": (16,)}


def test_geglu_feed_forward_formula():
    torch.manual_seed(0)
    ff = FeedForward(8, glu=True).eval()
    x = torch.randn(3, 8)
    a, gate = ff.net[0].proj(x).chunk(2, dim=-1)
    assert torch.allclose(ff(x), ff.net[2](a * F.gelu(gate)), atol=1e-6)
    assert set(ff.state_dict()) == {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
    plain = FeedForward(8, dim_out=5, mult=2).eval()
    assert torch.allclose(plain(x), plain.net[2](F.gelu(plain.net[0][0](x))), atol=1e-6)


def test_transformer_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, n_heads=2, d_head=8, context_dim=6).eval()
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 3, 6)
    h = block.attn1(block.norm1(x)) + x
    h = block.attn2(block.norm2(h), context=ctx) + h
    expected = block.ff(block.norm3(h)) + h
    assert torch.allclose(block(x, context=ctx), expected, atol=1e-6)


def test_spatial_transformer_identity_at_init_and_names():
    st = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=6).eval()
    x, ctx = torch.randn(2, 32, 4, 5), torch.randn(2, 3, 6)
    assert torch.equal(st(x, ctx), x)  # zero-initialised proj_out
    keys = set(st.state_dict())
    assert {"norm.weight", "proj_in.weight", "proj_out.weight", "transformer_blocks.1.attn2.to_k.weight",
            "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.0.norm3.bias"} <= keys
    assert st.proj_in.weight.shape == (16, 32, 1, 1) and st.norm.eps == 1e-6


def test_spatial_transformer_linear_projection_equals_conv():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=6).eval()
    with torch.no_grad():
        conv.proj_out.weight.normal_()
        conv.proj_out.bias.normal_()
    lin = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=6, use_linear=True).eval()
    sd = {k: (v.squeeze(-1).squeeze(-1) if k.startswith(("proj_in.weight", "proj_out.weight")) else v)
          for k, v in conv.state_dict().items()}
    lin.load_state_dict(sd, strict=True)
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 6)
    out = conv(x, ctx)
    assert not torch.allclose(out, x)
    assert torch.allclose(out, lin(x, ctx), atol=1e-5)


def test_spatial_transformer_tokens_are_pixels():
    """Permuting the pixels of the input permutes the output the same way (no positional bias)."""
    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=6).eval()
    with torch.no_grad():
        st.proj_out.weight.normal_()
    x, ctx = torch.randn(1, 32, 4, 4), torch.randn(1, 3, 6)
    perm = torch.randperm(16)
    xp = x.flatten(2)[:, :, perm].reshape_as(x)
    assert torch.allclose(st(xp, ctx).flatten(2), st(x, ctx).flatten(2)[:, :, perm], atol=1e-5)


def test_attention_under_bf16_autocast_stays_close():
    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=8).eval()
    with torch.no_grad():
        st.proj_out.weight.normal_(std=0.05)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 8)
    ref = st(x, ctx) - x  # the transformer's contribution, without the residual input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = st(x, ctx).float() - x
    assert ref.norm() > 0.1 * x.norm()
    assert (low - ref).norm() / ref.norm() < 0.05
