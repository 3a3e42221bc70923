"""UNetModel: compatibility with the original state dicts, and numerical identities of its parts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ldm.modules.diffusionmodules.openaimodel import (
    AttentionBlock,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepEmbedSequential,
    UNetModel,
)
from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, timestep_embedding
from ldm.util import instantiate_from_config
from tests.helpers.paths import REFERENCE_CONFIGS

MANIFESTS = Path(__file__).parent / "data" / "reference_state_dicts"
INDEX = json.loads((MANIFESTS / "index.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run much faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_config(rel: str) -> dict:
    yaml = pytest.importorskip("yaml")
    path = REFERENCE_CONFIGS / rel
    if not path.is_file():
        pytest.skip(f"reference config {path} not present (set LDM_SHARED_DIR)")
    return yaml.safe_load(path.read_text())["model"]["params"]


def assert_matches_manifest(model: torch.nn.Module, manifest_file: str) -> None:
    """Same names and shapes as the original, and a state dict of those loads with strict=True."""
    ref = json.loads((MANIFESTS / manifest_file).read_text())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ref) - set(ours)) == [], "names missing from our state dict"
    assert sorted(set(ours) - set(ref)) == [], "names the original does not have"
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}, "shape mismatches"
    fake = {k: torch.empty(shape, device="meta") for k, shape in ref.items()}
    model.load_state_dict(fake, strict=True, assign=True)


def test_manifests_cover_every_reference_ldm_config():
    if not REFERENCE_CONFIGS.is_dir():
        pytest.skip(f"reference configs not found under {REFERENCE_CONFIGS}")
    files = list(REFERENCE_CONFIGS.glob("latent-diffusion/models/ldm/*/config.yaml"))
    files += list(REFERENCE_CONFIGS.glob("latent-diffusion/configs/*/*.yaml"))
    files += list(REFERENCE_CONFIGS.glob("stable-diffusion/configs/stable-diffusion/*.yaml"))
    with_unet = {str(f.relative_to(REFERENCE_CONFIGS)) for f in files if "unet_config" in f.read_text()}
    assert with_unet and with_unet <= set(INDEX)


@pytest.mark.parametrize("rel", sorted(r for r, e in INDEX.items() if "unet" in e))
def test_reference_unet_state_dict_matches_original(rel):
    cfg = reference_config(rel)["unet_config"]
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    assert_matches_manifest(model, INDEX[rel]["unet"])


def tiny_unet(**overrides) -> UNetModel:
    cfg = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
               attention_resolutions=[2], channel_mult=[1, 2], num_heads=2)
    cfg.update(overrides)
    return UNetModel(**cfg)


def randomize(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturbs every parameter so zero-initialised layers no longer hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim = 7  # odd: trailing zero column
    emb = timestep_embedding(t, dim, max_period=10000)
    assert emb.shape == (4, 7) and emb.dtype == torch.float32
    half = dim // 2
    for n, tn in enumerate(t.tolist()):
        for i in range(half):
            f = math.exp(-math.log(10000) * i / half)
            assert emb[n, i].item() == pytest.approx(math.cos(tn * f), abs=1e-4)
            assert emb[n, half + i].item() == pytest.approx(math.sin(tn * f), abs=1e-4)
        assert emb[n, -1].item() == 0.0
    rep = timestep_embedding(torch.tensor([3, 5]), 4, repeat_only=True)
    assert torch.equal(rep, torch.tensor([[3] * 4, [5] * 4]))


def test_unet_is_zero_at_init_and_shapes():
    model = tiny_unet(num_classes=4, use_scale_shift_norm=True, resblock_updown=True)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([1, 900]), y=torch.tensor([0, 3]))
    assert out.shape == (2, 3, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution
    randomize(model)
    out = model(x, torch.tensor([1, 900]), y=torch.tensor([0, 3]))
    assert out.abs().sum() > 0
    # a scalar timestep is broadcast over the batch
    assert torch.allclose(model(x, torch.tensor(5), y=torch.tensor([0, 3])),
                          model(x, torch.tensor([5, 5]), y=torch.tensor([0, 3])))


def test_unet_conditioning_changes_output():
    model = randomize(tiny_unet(num_classes=3))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 10])
    a = model(x, t, y=torch.tensor([0, 0]))
    b = model(x, t, y=torch.tensor([1, 0]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)  # per-sample
    c = model(x, torch.tensor([500, 10]), y=torch.tensor([0, 0]))
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1], c[1], atol=1e-6)


def test_unet_cross_attention_context_changes_output_per_sample():
    model = randomize(tiny_unet(use_spatial_transformer=True, context_dim=12, num_head_channels=16, num_heads=-1))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 3])
    ctx = torch.randn(2, 5, 12)
    ctx2 = ctx.clone()
    ctx2[0] += 1.0
    a, b = model(x, t, context=ctx), model(x, t, context=ctx2)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)


def plain_attention(q, k, v):
    """softmax(q^T k / sqrt(d)) v for [B x C x T] tensors."""
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(q.shape[1]), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v)


def test_qkv_attention_layouts_equal_plain_softmax():
    heads, ch, t, bs = 3, 4, 10, 2
    q, k, v = (torch.randn(bs, heads, ch, t) for _ in range(3))
    expected = plain_attention(*(z.reshape(bs * heads, ch, t) for z in (q, k, v))).reshape(bs, heads * ch, t)
    legacy = torch.stack([q, k, v], dim=2).reshape(bs, heads * 3 * ch, t)  # heads, then q/k/v
    new = torch.stack([q, k, v], dim=1).reshape(bs, 3 * heads * ch, t)  # q/k/v, then heads
    assert torch.allclose(QKVAttentionLegacy(heads)(legacy), expected, atol=1e-5)
    assert torch.allclose(QKVAttention(heads)(new), expected, atol=1e-5)


def legacy_to_new_qkv(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorders qkv rows from (head, q/k/v, c) to (q/k/v, head, c)."""
    rows = weight.shape[0]
    ch = rows // (3 * heads)
    return weight.reshape(heads, 3, ch, *weight.shape[1:]).transpose(0, 1).reshape(rows, *weight.shape[1:])


def test_legacy_and_new_attention_order_agree_under_weight_permutation():
    legacy = randomize(tiny_unet(num_heads=4, attention_resolutions=[1, 2]))
    new = tiny_unet(num_heads=4, attention_resolutions=[1, 2], use_new_attention_order=True)
    sd = legacy.state_dict()
    for name, module in legacy.named_modules():
        if isinstance(module, AttentionBlock):
            for p in ("weight", "bias"):
                sd[f"{name}.qkv.{p}"] = legacy_to_new_qkv(sd[f"{name}.qkv.{p}"], module.num_heads)
    new.load_state_dict(sd, strict=True)
    new.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([4, 600])
    assert torch.allclose(legacy(x, t), new(x, t), atol=1e-5)
    # and without the permutation they differ (the layouts really are different)
    new.load_state_dict(legacy.state_dict())
    assert not torch.allclose(legacy(x, t), new(x, t), atol=1e-3)


def test_head_rules_of_the_original():
    # num_head_channels wins over num_heads; legacy decoders use num_heads_upsample when given heads
    m = tiny_unet(num_heads=-1, num_head_channels=16, attention_resolutions=[1, 2])
    assert [a.num_heads for a in m.modules() if isinstance(a, AttentionBlock)] == [2, 4, 4, 4, 4, 2, 2]
    m = tiny_unet(num_heads=2, num_heads_upsample=1, attention_resolutions=[1])
    heads = [a.num_heads for a in m.modules() if isinstance(a, AttentionBlock)]
    assert heads == [2, 2, 1, 1]  # encoder at ds=1, middle (always), decoder blocks at ds=1
    st = tiny_unet(use_spatial_transformer=True, context_dim=8, num_heads=4, legacy=False, attention_resolutions=[1])
    blocks = [b for b in st.modules() if b.__class__.__name__ == "BasicTransformerBlock"]
    assert {b.attn1.heads for b in blocks} == {4}


def test_resblock_resampling_and_skip():
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    assert ResBlock(32, 16, 0.0, down=True)(x, emb).shape == (2, 32, 4, 4)
    assert ResBlock(32, 16, 0.0, up=True)(x, emb).shape == (2, 32, 16, 16)
    block = ResBlock(32, 16, 0.0, out_channels=64)
    # at init the residual branch is zero: the block is its 1x1 skip convolution
    assert torch.allclose(block(x, emb), block.skip_connection(x), atol=1e-6)
    assert torch.allclose(ResBlock(32, 16, 0.0)(x, emb), x)


def test_timestep_embed_sequential_routes_arguments():
    seq = TimestepEmbedSequential(ResBlock(32, 16, 0.0), torch.nn.Identity())
    x, emb = torch.randn(1, 32, 4, 4), torch.randn(1, 16)
    assert torch.allclose(seq(x, emb), x)


def test_checkpointing_gives_identical_gradients():
    ref = randomize(tiny_unet(use_spatial_transformer=True, context_dim=8, attention_resolutions=[1, 2]))
    ckpt = tiny_unet(use_spatial_transformer=True, context_dim=8, attention_resolutions=[1, 2], use_checkpoint=True)
    ckpt.load_state_dict(ref.state_dict())
    ckpt.eval()
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 8)
    grads = []
    for model in (ref, ckpt):
        model.zero_grad()
        model(x, t, context=ctx).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    # the checkpoint helper itself: without grad it is a plain call
    with torch.no_grad():
        assert checkpoint(lambda a: a * 2, (torch.ones(1),), None, True).item() == 2


def test_bf16_autocast_and_channels_last():
    model = randomize(tiny_unet(use_spatial_transformer=True, context_dim=8, attention_resolutions=[2]))
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 700]), torch.randn(2, 4, 8)
    ref = model(x, t, context=ctx)
    cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, context=ctx)
    assert torch.allclose(ref, cl, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, context=ctx)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).norm() / ref.norm() < 0.05
    # a model cast to bfloat16 as a whole runs too (normalisation in float32) and returns bfloat16
    half = model.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert half.dtype == torch.bfloat16 and (half.float() - ref).norm() / ref.norm() < 0.05
    norm = GroupNorm32(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_spatial_transformer=True), "context_dim"),
    (dict(context_dim=8), "use_spatial_transformer"),
    (dict(num_heads=-1), "num_heads"),
    (dict(use_fp16=True), "mixed precision"),
])
def test_invalid_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_unet(**kwargs)


def test_class_labels_required_iff_class_conditional():
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_unet(num_classes=3)(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_unet()(x, t, y=torch.tensor([0]))


def test_codebook_prediction_head():
    model = tiny_unet(n_embed=11)
    assert model(torch.randn(1, 3, 8, 8), torch.tensor([2])).shape == (1, 11, 8, 8)


def test_original_util_import_paths():
    from ldm.models.diffusion.schedule import make_beta_schedule as owner
    from ldm.modules.diffusionmodules import util

    assert util.make_beta_schedule is owner  # re-exported, not recomputed
    torch.manual_seed(0)
    n = util.noise_like((3, 2, 4), "cpu", repeat=True)
    assert n.shape == (3, 2, 4) and torch.equal(n[0], n[2])
    assert not torch.equal(*util.noise_like((2, 5), "cpu"))
    with pytest.raises(ValueError, match="dimensions"):
        util.conv_nd(4, 1, 1, 1)


def test_dropout_only_in_residual_blocks_as_the_original():
    model = tiny_unet(dropout=0.3, use_spatial_transformer=True, context_dim=8)
    res = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "out_layers" in n]
    other = [m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "out_layers" not in n]
    assert set(res) == {0.3} and other and set(other) == {0.0}  # the transformers get no dropout


def tiny_encoder(**overrides):
    from ldm.modules.diffusionmodules.openaimodel import EncoderUNetModel

    cfg = dict(image_size=8, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
               attention_resolutions=[2], channel_mult=[1, 2], num_heads=2)
    cfg.update(overrides)
    return EncoderUNetModel(**cfg)


def test_encoder_unet_heads():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 400])
    adaptive = tiny_encoder()
    assert torch.count_nonzero(adaptive(x, t)) == 0  # zero-initialised projection
    out = randomize(adaptive)(x, t)
    assert out.shape == (2, 5) and torch.allclose(adaptive(x[:1], t[:1]), out[:1], atol=1e-5)
    spatial = tiny_encoder(pool="spatial_v2")
    # spatial means of every block: conv 32 + res 32 + down 32 + res 64, and the middle block 64
    assert spatial.out[0].in_features == 32 + 32 + 32 + 64 + 64
    assert spatial(x, t).shape == (2, 5)
    assert tiny_encoder(pool="attention", num_head_channels=16, num_heads=-1)(x, t).shape == (2, 5)
    with pytest.raises(ValueError, match="num_head_channels"):
        tiny_encoder(pool="attention")
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        tiny_encoder(pool="max")


def test_attention_pool_of_a_constant_map_is_its_value_projection():
    from ldm.modules.diffusionmodules.openaimodel import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=8, num_heads_channels=4, output_dim=6)
    with torch.no_grad():
        pool.positional_embedding.zero_()
    v = torch.randn(2, 8)
    x = v[:, :, None, None].expand(2, 8, 3, 3)
    w, b = pool.qkv_proj.weight[16:, :, 0], pool.qkv_proj.bias[16:]
    expected = pool.c_proj(((v @ w.T) + b)[:, :, None])[:, :, 0]
    assert torch.allclose(pool(x), expected, atol=1e-5)


def conv_input_layouts(model: torch.nn.Module, *inputs, **kwargs) -> dict[str, torch.memory_format]:
    """The memory format of the input of every 2-D convolution in one forward pass of `model`."""
    from ldm.modules.diffusionmodules.util import memory_format_of

    seen: dict[str, torch.memory_format] = {}

    def record(name: str, args: tuple) -> None:
        seen[name] = memory_format_of(args[0])

    handles = [m.register_forward_pre_hook(lambda m, args, name=name: record(name, args))
               for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("transformer", [True, False])
def test_feature_maps_keep_one_layout_through_attention(transformer):
    """Attention blocks reshape maps into tokens and back; the map they return must have the input's layout.

    Before the fix, the channels-last view left by the SpatialTransformer's ``[B x HW x C] -> [B x C x H x W]``
    reshape reached every following convolution, whose weights (contiguous) were then converted in the forward and
    backward of each step (a fifth of the SD-v1 training step on CPU).
    """
    kwargs = dict(use_spatial_transformer=True, context_dim=8, num_heads=-1, num_head_channels=16) if transformer \
        else dict(num_heads=2)
    model = randomize(tiny_unet(attention_resolutions=[1, 2], **kwargs))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    ctx = {"context": torch.randn(2, 4, 8)} if transformer else {}
    layouts = conv_input_layouts(model, x, t, **ctx)
    assert len(layouts) > 10 and set(layouts.values()) == {torch.contiguous_format}
    ref = model(x, t, **ctx)
    model = model.to(memory_format=torch.channels_last)
    cl = x.to(memory_format=torch.channels_last)
    layouts = conv_input_layouts(model, cl, t, **ctx)
    # the 1x1 maps at the bottom of an 8x8 input are both layouts at once; every other map stays channels-last
    assert set(layouts.values()) == {torch.channels_last}
    assert torch.allclose(model(cl, t, **ctx), ref, atol=1e-5)
