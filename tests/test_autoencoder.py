"""Stage-one autoencoders: zoo configs, original parameter names, strict loading, shapes and f, the LDM-facing API."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict
from ldm.models.autoencoder import (AutoencoderKL, IdentityFirstStage, VQAutoencoder, VQModel, VQModelInterface,
                                    allow_missing_checkpoints)
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample, Encoder, LinAttnBlock, split_ddconfig
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.lpips import vgg16_weights_path
from ldm.util import ConfigError, instantiate_from_config
from tests.helpers.paths import REFERENCE_CONFIGS

REFERENCE = REFERENCE_CONFIGS
ZOO = sorted((REFERENCE / "latent-diffusion/models/first_stage_models").glob("*/config.yaml"))
AE_CONFIGS = sorted((REFERENCE / "latent-diffusion/configs/autoencoder").glob("*.yaml"))
LDM_CONFIGS = sorted(p for p in REFERENCE.rglob("*.yaml")
                     if "first_stage_config" in p.read_text() and "first_stage_models" not in str(p))
IDENTITY_LOSS = {"target": "torch.nn.Identity"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fake_vgg(tmp_path_factory):
    """A torch hub dir holding a random VGG16 file under torchvision's name (TORCH_HOME points at it)."""
    from torchvision.models.vgg import cfgs, make_layers

    home = tmp_path_factory.mktemp("torch_home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(home))
    path = vgg16_weights_path()
    path.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    yield path
    mp.undo()


def _model_cfg(path: Path):
    return OmegaConf.load(path).model


def _f(ddconfig) -> int:
    return 2 ** (len(ddconfig.ch_mult) - 1)


def _check_latent_shapes(model, ddconfig, embed_dim: int, size: int, device: str | torch.device) -> None:
    x = torch.zeros(1, ddconfig.in_channels, size, size, device=device)
    f = _f(ddconfig)
    assert model.downsampling_factor == f
    enc = model.encode(x)
    if isinstance(model, VQModelInterface):
        z = enc
        dec = model.decode(z)
    elif isinstance(model, VQModel):
        z = enc[0]
        dec = model.decode(z)
    else:
        assert isinstance(enc, DiagonalGaussianDistribution)
        z = enc.sample()
        dec = model.decode(z)
    assert z.shape == (1, embed_dim, size // f, size // f)
    assert dec.shape == (1, ddconfig.out_ch, size, size)


# --- every first-stage config of the reference set instantiates unchanged --------------------------------------------
@pytest.mark.parametrize("path", ZOO + AE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_reference_first_stage_config_instantiates(path, fake_vgg):
    cfg = _model_cfg(path)
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    p = cfg.params
    assert model.embed_dim == p.embed_dim and getattr(model, "monitor", None) == p.get("monitor")
    sd = model.state_dict()
    z = p.ddconfig.z_channels
    if isinstance(model, VQAutoencoder):
        assert sd["quantize.embedding.weight"].shape == (p.n_embed, p.embed_dim)
        assert sd["quant_conv.weight"].shape == (p.embed_dim, z, 1, 1)
        assert "loss.discriminator.main.0.weight" in sd and "loss.logvar" not in sd
    else:
        assert sd["quant_conv.weight"].shape == (2 * p.embed_dim, 2 * z, 1, 1)
        assert sd["loss.logvar"].shape == ()
    assert sd["loss.perceptual_loss.lin4.model.1.weight"].shape == (1, 512, 1, 1)
    _check_latent_shapes(model, p.ddconfig, p.embed_dim, 256, "meta")


@pytest.mark.parametrize("path", LDM_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_first_stage_of_ldm_configs_instantiates(path):
    cfg = OmegaConf.load(path).model.params.first_stage_config
    ckpt = cfg.params.get("ckpt_path")
    if ckpt is not None and not Path(ckpt).exists():
        with pytest.raises(FileNotFoundError, match=str(ckpt).replace(".", r"\.")):
            with torch.device("meta"):
                instantiate_from_config(cfg)
    with torch.device("meta"):
        model = instantiate_from_config(allow_missing_checkpoints(cfg))
    assert not any(k.startswith("loss.") for k in model.state_dict())
    _check_latent_shapes(model, cfg.params.ddconfig, cfg.params.embed_dim, 64, "meta")


# --- original parameter names ----------------------------------------------------------------------------------------
ORIGINAL_KL_F8 = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.bias": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.3.block.1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.block_1.norm2.bias": (512,),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "loss.logvar": (),
    "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1),
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.perceptual_loss.net.slice2.7.weight": (128, 128, 3, 3),
    "loss.perceptual_loss.net.slice5.28.bias": (512,),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
    "loss.discriminator.main.0.weight": (64, 3, 4, 4),
    "loss.discriminator.main.0.bias": (64,),
    "loss.discriminator.main.2.weight": (128, 64, 4, 4),
    "loss.discriminator.main.3.running_var": (128,),
    "loss.discriminator.main.3.num_batches_tracked": (),
    "loss.discriminator.main.8.weight": (512, 256, 4, 4),
    "loss.discriminator.main.11.weight": (1, 512, 4, 4),
    "loss.discriminator.main.11.bias": (1,),
}
ORIGINAL_VQ_F8 = {
    "quantize.embedding.weight": (16384, 4),
    "quant_conv.weight": (4, 4, 1, 1),
    "encoder.conv_out.weight": (4, 512, 3, 3),
    "encoder.down.3.attn.1.k.weight": (512, 512, 1, 1),
    "encoder.down.2.downsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.3.attn.2.proj_out.weight": (512, 512, 1, 1),
    "decoder.up.2.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "loss.discriminator.main.5.weight": (256, 128, 4, 4),
    "loss.discriminator.main.8.weight": (1, 256, 4, 4),
}


@pytest.mark.parametrize("name, expected", [("kl-f8", ORIGINAL_KL_F8), ("vq-f8", ORIGINAL_VQ_F8)])
def test_original_parameter_names_and_shapes(name, expected, fake_vgg):
    cfg = _model_cfg(REFERENCE / f"latent-diffusion/models/first_stage_models/{name}/config.yaml")
    with torch.device("meta"):
        sd = instantiate_from_config(cfg).state_dict()
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(".attn." in k for k in sd if k.startswith("encoder.down.0"))
    assert not any("temb" in k for k in sd)  # the first stage has no timestep embedding


def test_noattn_config_has_no_attention_parameters(fake_vgg):
    cfg = _model_cfg(REFERENCE / "latent-diffusion/models/first_stage_models/vq-f4-noattn/config.yaml")
    with torch.device("meta"):
        sd = instantiate_from_config(cfg).state_dict()
    assert not any("attn" in k for k in sd)
    assert "encoder.mid.block_2.conv1.weight" in sd


# --- shapes and f for every zoo config at small size -----------------------------------------------------------------
@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.parent.name)
def test_zoo_shapes_at_small_size(path):
    cfg = _model_cfg(path)
    cfg.params.ddconfig.ch = 32
    cfg.params.lossconfig = IDENTITY_LOSS
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).eval()
    f = _f(cfg.params.ddconfig)
    assert f == int(path.parent.name.split("-")[1][1:])  # the name says f: kl-f8 -> 8
    with torch.no_grad():
        _check_latent_shapes(model, cfg.params.ddconfig, cfg.params.embed_dim, max(2 * f, 16), "cpu")
        if isinstance(model, VQModel):
            cfg.target = "ldm.models.autoencoder.VQModelInterface"
            iface = instantiate_from_config(cfg).eval()
            iface.load_state_dict(model.state_dict(), strict=True)
            x = torch.rand(1, 3, max(2 * f, 16), max(2 * f, 16)) * 2 - 1
            h = iface.encode(x)
            torch.testing.assert_close(iface.decode(h), model(x)[0])  # decode quantises
            torch.testing.assert_close(iface.decode(model.encode(x)[0], force_not_quantize=True), model(x)[0])


# --- strict loading, loss keys, missing checkpoints ------------------------------------------------------------------
def _tiny_ddconfig(**over):
    dd = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    dd.update(over)
    return dd


KL_LOSS = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
           "params": {"disc_start": 1, "disc_num_layers": 2, "perceptual_weights": "random"}}
VQ_LOSS = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
           "params": {"disc_start": 1, "disc_num_layers": 2, "perceptual_weights": "random"}}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_checkpoint_roundtrip_strict_and_loss_keys_ignored_inside_ldm(kind, tmp_path, caplog):
    torch.manual_seed(0)
    if kind == "kl":
        make = lambda loss, **kw: AutoencoderKL(ddconfig=_tiny_ddconfig(), lossconfig=loss, embed_dim=3, **kw)  # noqa
        loss_cfg = KL_LOSS
    else:
        make = lambda loss, **kw: VQModel(ddconfig=_tiny_ddconfig(double_z=False), lossconfig=loss,  # noqa
                                          n_embed=16, embed_dim=3, **kw)
        loss_cfg = VQ_LOSS
    trained = make(loss_cfg)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sd = trained.state_dict()
    assert any(k.startswith("loss.") for k in sd)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, ckpt)

    fresh = make(loss_cfg)
    fresh.load_state_dict(load_state_dict(ckpt), strict=True)
    loaded = make(loss_cfg, ckpt_path=str(ckpt))
    with caplog.at_level("INFO", logger="ldm.models.autoencoder"):
        inner = make(IDENTITY_LOSS, ckpt_path=str(ckpt))  # as built inside an LDM: no loss.* keys of its own
    assert "ignoring" in caplog.text and "'loss.*' keys" in caplog.text
    assert "0 missing and 0 unexpected keys" in caplog.text
    assert not any(k.startswith("loss.") for k in inner.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        if kind == "kl":
            ref = trained.eval().encode(x).mode()
            for m in (fresh, loaded, inner):
                torch.testing.assert_close(m.eval().encode(x).mode(), ref)
            torch.testing.assert_close(inner.decode(ref), trained.decode(ref))
        else:
            ref = trained.eval()(x)[0]
            for m in (fresh, loaded, inner):
                torch.testing.assert_close(m.eval()(x)[0], ref)
    for k, v in inner.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    # inside a parent (LatentDiffusion's first_stage_model), a strict load of a state dict with loss.* keys works
    parent = torch.nn.Module()
    parent.first_stage_model = make(IDENTITY_LOSS)
    result = parent.load_state_dict({f"first_stage_model.{k}": v for k, v in sd.items()}, strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    # a model WITH a loss still reports a missing loss key as missing
    partial = {k: v for k, v in sd.items() if not k.startswith("loss.discriminator")}
    with pytest.raises(RuntimeError, match="loss.discriminator"):
        make(loss_cfg).load_state_dict(partial, strict=True)


def test_missing_ckpt_path_error_and_explicit_switch(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "model.ckpt"
    kw = dict(ddconfig=_tiny_ddconfig(), lossconfig=IDENTITY_LOSS, embed_dim=3, ckpt_path=str(missing))
    with pytest.raises(FileNotFoundError, match="allow_missing_ckpt") as e:
        AutoencoderKL(**kw)
    assert str(missing) in str(e.value)
    torch.manual_seed(0)
    built = AutoencoderKL(**kw, allow_missing_ckpt=True)
    torch.manual_seed(0)
    fresh = AutoencoderKL(**{**kw, "ckpt_path": None})
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in built.state_dict().items())  # initial weights
    monkeypatch.setenv("LDM_ALLOW_MISSING_CKPT", "1")  # no environment variable changes a constructor
    with pytest.raises(FileNotFoundError):
        AutoencoderKL(**kw)
    # the function sets the parameter on every first stage of a config, at any depth, and copies the config
    ldm_cfg = {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
               "params": {"first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                                                 "params": {"ckpt_path": str(missing), "n_embed": 8}},
                          "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder"}}}
    out = allow_missing_checkpoints(ldm_cfg)
    assert out["params"]["first_stage_config"]["params"] == {"ckpt_path": str(missing), "n_embed": 8,
                                                             "allow_missing_ckpt": True}
    assert "params" not in out["params"]["cond_stage_config"]
    assert "allow_missing_ckpt" not in ldm_cfg["params"]["first_stage_config"]["params"]


def test_ignore_keys_when_loading(tmp_path):
    torch.manual_seed(0)
    a = AutoencoderKL(ddconfig=_tiny_ddconfig(), lossconfig=IDENTITY_LOSS, embed_dim=3)
    torch.save({"state_dict": {k: v + 1 for k, v in a.state_dict().items()}}, tmp_path / "m.ckpt")
    b = AutoencoderKL(ddconfig=_tiny_ddconfig(), lossconfig=IDENTITY_LOSS, embed_dim=3,
                      ckpt_path=str(tmp_path / "m.ckpt"), ignore_keys=["decoder."])
    torch.testing.assert_close(b.encoder.conv_in.weight, a.encoder.conv_in.weight + 1)
    assert not torch.equal(b.decoder.conv_in.weight, a.decoder.conv_in.weight + 1)


# --- building blocks -------------------------------------------------------------------------------------------------
def test_attention_block_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 4)
    h = blk.norm(x)
    q, k, v = blk.q(h).flatten(2), blk.k(h).flatten(2), blk.v(h).flatten(2)  # [N x C x HW]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=2)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 32, 5, 4)
    torch.testing.assert_close(blk(x), x + blk.proj_out(out), rtol=1e-5, atol=1e-5)


def test_attention_block_returns_the_layout_of_its_input():
    """Its tokens are a channels-last view of the map: proj_out must get (and return) the input's layout."""
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 4)
    ref = blk(x)
    assert ref.is_contiguous()
    blk = blk.to(memory_format=torch.channels_last)
    seen = []
    blk.proj_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    out = blk(x)
    assert seen == [True] and out.is_contiguous()
    cl = blk(x.to(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-5)


def test_linear_and_none_attention_types():
    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[8], in_channels=3, resolution=16,
                  z_channels=2, attn_type="linear")
    assert isinstance(enc.mid.attn_1, LinAttnBlock) and isinstance(enc.down[1].attn[0], LinAttnBlock)
    assert enc.mid.attn_1.to_qkv.weight.shape == (192, 64, 1, 1)
    blk = enc.mid.attn_1
    x = torch.randn(1, 64, 3, 3)
    q, k, v = blk.to_qkv(x).reshape(1, 3, 64, 9).unbind(1)
    k = k.softmax(-1)
    expected = blk.to_out((k @ v.transpose(1, 2)).transpose(1, 2).matmul(q).reshape(1, 64, 3, 3))
    torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)
    assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    none = Encoder(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=[16], in_channels=3, resolution=16,
                   z_channels=2, attn_type="none")
    assert not any("attn" in k for k, _ in none.named_parameters())
    with pytest.raises(ConfigError, match="unknown attn_type 'fancy'"):
        Encoder(ch=32, num_res_blocks=1, attn_resolutions=[], in_channels=3, resolution=16, z_channels=2,
                attn_type="fancy")


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    dd = _tiny_ddconfig()
    plain = AutoencoderKL(ddconfig=dd, lossconfig=IDENTITY_LOSS, embed_dim=3)
    ckpt = AutoencoderKL(ddconfig={**dd, "use_checkpoint": True}, lossconfig=IDENTITY_LOSS, embed_dim=3)
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for m in (plain, ckpt):
        m.decode(m.encode(x).mode()).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    ds = Downsample(4, with_conv=True)
    x = torch.randn(1, 4, 6, 6)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), ds.conv.weight, ds.conv.bias, stride=2)
    torch.testing.assert_close(ds(x), ref)
    assert ds(x).shape == (1, 4, 3, 3)
    torch.testing.assert_close(Downsample(4, False)(x), torch.nn.functional.avg_pool2d(x, 2))


def test_ddconfig_errors_name_the_key():
    with pytest.raises(ConfigError, match="ddconfig.z_channel'.*z_channels"):
        split_ddconfig({**{k: v for k, v in _tiny_ddconfig().items() if k != "z_channels"}, "z_channel": 4})
    with pytest.raises(ConfigError, match="double_z"):
        AutoencoderKL(ddconfig=_tiny_ddconfig(double_z=False), lossconfig=IDENTITY_LOSS, embed_dim=3)
    with pytest.raises(ConfigError, match="ddconfig.chh.*did you mean ch"):
        instantiate_from_config({"target": "ldm.models.autoencoder.AutoencoderKL",
                                 "params": {"ddconfig": _tiny_ddconfig(chh=32), "lossconfig": IDENTITY_LOSS,
                                            "embed_dim": 3}})


# --- the API the rest of the project uses ----------------------------------------------------------------------------
def test_get_input_log_images_and_decode_code():
    torch.manual_seed(0)
    kl = AutoencoderKL(ddconfig=_tiny_ddconfig(), lossconfig=IDENTITY_LOSS, embed_dim=3).eval()
    hwc = torch.rand(2, 32, 32, 3) * 2 - 1
    x = kl.get_input({"image": hwc}, "image")
    assert x.shape == (2, 3, 32, 32) and x.is_contiguous() and x.dtype == torch.float32
    torch.testing.assert_close(x[1, 2], hwc[1, :, :, 2])
    with pytest.raises(KeyError, match="'jpg'"):
        kl.get_input({"image": hwc}, "jpg")
    log = kl.log_images({"image": hwc})
    assert set(log) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (2, 3, 32, 32) for v in log.values())
    assert set(kl.log_images({"image": hwc}, only_inputs=True)) == {"inputs"}

    vq = VQModel(ddconfig=_tiny_ddconfig(double_z=False), lossconfig=IDENTITY_LOSS, n_embed=8, embed_dim=3,
                 sane_index_shape=True).eval()
    with torch.no_grad():
        quant, _, (_, _, idx) = vq.encode(x)
        assert idx.shape == (2, 16, 16)
        torch.testing.assert_close(vq.decode_code(idx), vq.decode(quant))
    log = vq.log_images({"image": hwc})
    assert set(log) == {"inputs", "reconstructions"} and log["reconstructions"].shape == (2, 3, 32, 32)


def test_vq_batch_resize_range_only_in_training():
    vq = VQModel(ddconfig=_tiny_ddconfig(double_z=False), lossconfig=IDENTITY_LOSS, n_embed=8, embed_dim=3,
                 batch_resize_range=(16, 48))
    batch = {"image": torch.rand(2, 32, 32, 3)}
    assert vq.train().get_input(batch, "image").shape == (2, 3, 48, 48)  # the first batches at the largest size
    assert vq.eval().get_input(batch, "image").shape == (2, 3, 32, 32)


def test_identity_first_stage():
    x = torch.randn(2, 3, 4, 4)
    ident = instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage"})
    assert ident.encode(x) is x and ident.decode(x) is x and ident.quantize(x) is x and ident(x) is x
    q = IdentityFirstStage(vq_interface=True).quantize(x)
    assert q[0] is x and q[1] is None and list(q[2]) == [None, None, None]
    assert list(ident.state_dict()) == []


def test_model_copies_share_no_state():
    """deepcopy (used by EMA / checkpoint callbacks) gives a model with its own tensors whose load hook (drop the
    foreign `loss.*` keys) works on the copy, and loading into the copy leaves the original alone."""
    a = AutoencoderKL(ddconfig=_tiny_ddconfig(), lossconfig=IDENTITY_LOSS, embed_dim=3)
    b = copy.deepcopy(a)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    assert {v.data_ptr() for v in a.state_dict().values()}.isdisjoint(v.data_ptr() for v in b.state_dict().values())
    sd = {**{k: v + 1 for k, v in before.items()}, "loss.logvar": torch.tensor(0.0)}
    b.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in b.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
