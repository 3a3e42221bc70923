"""LatentDiffusion: conditioning-key routing, first/cond stages, scale_by_std, CFG dropout, a falling loss."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.conditioning import drop_conditioning, null_input
from ldm.models.diffusion.ddpm import LatentDiffusion
from tests.test_ddpm_support import SpyUNet

IDENTITY = {"target": "tests.test_ddpm_support.IdentityStage", "params": {"embed_dim": 3}}
CLASSES = {"target": "tests.test_ddpm_support.TinyClassEmbedder", "params": {"embed_dim": 8, "n_classes": 5}}
TEXT = {"target": "tests.test_ddpm_support.TinyTextEncoder", "params": {"embed_dim": 8}}


def spy(in_channels=3, out_channels=3):
    return {"target": "tests.test_ddpm_support.SpyUNet", "params": {"in_channels": in_channels,
                                                              "out_channels": out_channels}}


def make_ldm(**kw) -> LatentDiffusion:
    params = dict(unet_config=spy(), first_stage_config=IDENTITY, cond_stage_config="__is_unconditional__",
                  timesteps=20, image_size=4, channels=3, use_ema=False, first_stage_key="image")
    params.update(kw)
    return LatentDiffusion(**params)


def image_batch(n=3, hw=4, c=3, **extra):
    torch.manual_seed(1)
    return {"image": torch.rand(n, hw, hw, c) * 2 - 1, **extra}


def unet(m) -> SpyUNet:
    return m.model.diffusion_model


def test_unconditional_route_and_frozen_first_stage():
    m = make_ldm()
    assert m.model.conditioning_key is None and m.cond_stage_model is None
    z, c = m.get_input(image_batch(), "image")
    assert c is None and z.shape == (3, 3, 4, 4)
    loss, _ = m(z, c)
    call = unet(m).calls[-1]
    assert call["context"] is None and call["y"] is None and call["x"].shape == (3, 3, 4, 4)
    m.train()
    assert not m.first_stage_model.training and not m.first_stage_model.dummy.requires_grad
    assert "first_stage_model.dummy" in m.state_dict()


def test_concat_route_and_legacy_concat_mode():
    # legacy: no conditioning_key and concat_mode true (the default) means concat
    m = make_ldm(unet_config=spy(6, 3), cond_stage_config={"target": "torch.nn.Identity"},
                 cond_stage_key="lr", concat_mode=True)
    assert m.model.conditioning_key == "concat"
    batch = image_batch(lr=torch.rand(3, 4, 4, 3))
    z, c = m.get_input(batch, "image")
    torch.testing.assert_close(c, batch["lr"].permute(0, 3, 1, 2))
    m(z, c)
    x_in = unet(m).calls[-1]["x"]
    assert x_in.shape == (3, 6, 4, 4)
    torch.testing.assert_close(x_in[:, 3:], c)


def test_crossattn_route_with_class_labels():
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 cond_stage_trainable=True, concat_mode=False)
    batch = image_batch(class_label=torch.tensor([0, 2, 4]))
    z, c = m.get_input(batch, "image")
    assert c is batch  # trainable conditioner: encoded in forward
    m(z, c)
    ctx = unet(m).calls[-1]["context"]
    torch.testing.assert_close(ctx, m.cond_stage_model.embedding.weight[[0, 2, 4]][:, None])
    m.learning_rate = 1e-3
    opt_params = m.configure_optimizers().param_groups[0]["params"]
    assert any(p is m.cond_stage_model.embedding.weight for p in opt_params)


def test_hybrid_and_adm_routes():
    m = make_ldm(unet_config=spy(5, 3), conditioning_key="hybrid", cond_stage_config={"target": "torch.nn.Identity"})
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    concat, ctx = torch.randn(2, 2, 4, 4), torch.randn(2, 7, 8)
    m.apply_model(x, t, {"c_concat": [concat], "c_crossattn": [ctx]})
    call = unet(m).calls[-1]
    torch.testing.assert_close(call["x"], torch.cat([x, concat], 1))
    assert call["context"] is ctx or torch.equal(call["context"], ctx)
    adm = make_ldm(conditioning_key="adm", cond_stage_config={"target": "torch.nn.Identity"})
    y = torch.randn(2, 16)
    adm.apply_model(x, t, y)
    assert torch.equal(unet(adm).calls[-1]["y"], y) and unet(adm).calls[-1]["context"] is None
    with pytest.raises(ValueError, match="c_crossattn"):
        m.apply_model(x, t, {"c_concat": [concat]})
    with pytest.raises(ValueError, match="conditioning_key 'film'"):
        make_ldm(conditioning_key="film", cond_stage_config={"target": "torch.nn.Identity"})


def test_is_first_stage_conditioning_encodes_with_first_stage():
    kl = {"target": "tests.test_ddpm_support.ScaledKLStage", "params": {"scale": 4.0}}
    m = make_ldm(unet_config=spy(6, 3), first_stage_config=kl, cond_stage_config="__is_first_stage__",
                 cond_stage_key="masked_image", concat_mode=True)
    assert m.cond_stage_model is m.first_stage_model
    batch = image_batch(masked_image=torch.rand(3, 4, 4, 3))
    z, c = m.get_input(batch, "image")
    torch.testing.assert_close(z, 4.0 * batch["image"].permute(0, 3, 1, 2))
    torch.testing.assert_close(c, 4.0 * batch["masked_image"].permute(0, 3, 1, 2))  # mode of the posterior
    torch.testing.assert_close(m.decode_first_stage(z), batch["image"].permute(0, 3, 1, 2))
    keys = m.state_dict().keys()
    assert "first_stage_model.proj" in keys and "cond_stage_model.proj" in keys
    with pytest.raises(ValueError, match="nothing to train"):
        make_ldm(cond_stage_config="__is_first_stage__", cond_stage_trainable=True)


def test_scale_factor_plain_or_buffer_and_scale_by_std():
    kl = {"target": "tests.test_ddpm_support.ScaledKLStage", "params": {"scale": 4.0}}
    plain = make_ldm(first_stage_config=kl, scale_factor=0.5)
    assert plain.scale_factor == 0.5 and "scale_factor" not in plain.state_dict()
    m = make_ldm(first_stage_config=kl, scale_by_std=True)
    assert m.state_dict()["scale_factor"] == 1.0
    batch = image_batch(n=8, hw=8)
    m.on_train_batch_start(batch, 0)
    std = (4.0 * batch["image"]).flatten().std()
    torch.testing.assert_close(m.state_dict()["scale_factor"], 1.0 / std)
    z, _ = m.get_input(batch, "image")
    assert abs(z.flatten().std().item() - 1.0) < 1e-5
    again = make_ldm(first_stage_config=kl, scale_by_std=True)
    again.restarted_from_ckpt = True  # a resumed run keeps its saved factor
    again.on_train_batch_start(batch, 0)
    assert again.scale_factor.item() == 1.0
    with pytest.raises(ValueError, match="scale_by_std"):
        make_ldm(scale_by_std=True, scale_factor=0.18)


def test_null_condition_rules():
    texts = ["a cat", "a dog"]
    assert null_input(texts) == ["", ""]
    assert drop_conditioning(texts, torch.tensor([True, False])) == ["", "a dog"]
    labels = {"class_label": torch.tensor([1, 2, 3]), "image": None}
    dropped = drop_conditioning(labels, torch.tensor([False, True, True]), null_label=9, label_key="class_label")
    assert dropped["class_label"].tolist() == [1, 9, 9]
    maps = torch.ones(2, 3, 4, 4)
    out = drop_conditioning(maps, torch.tensor([True, False]))
    assert out[0].abs().sum() == 0 and torch.equal(out[1], maps[1])


def test_cfg_dropout_rate_and_unconditional_conditioning():
    torch.manual_seed(0)
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 ucg_rate=0.5)
    assert m.null_label == 4
    n = 4000
    batch = {"image": torch.zeros(n, 1, 1, 3), "class_label": torch.zeros(n, dtype=torch.long)}
    _, c, xc = m.get_input(batch, "image", return_original_cond=True, cond_dropout=True)
    frac = (xc["class_label"] == 4).float().mean().item()
    assert abs(frac - 0.5) < 0.04
    uc = m.get_unconditional_conditioning(3)
    torch.testing.assert_close(uc, m.cond_stage_model.embedding.weight[[4, 4, 4]][:, None])
    dropped = xc["class_label"] == 4
    torch.testing.assert_close(c[dropped][:3], uc)
    _, c_eval, xc_eval = m.get_input(batch, "image", return_original_cond=True)
    assert (xc_eval["class_label"] == 0).all()  # no dropout unless asked (validation, logging)
    text = make_ldm(cond_stage_config=TEXT, cond_stage_key="caption", conditioning_key="crossattn", ucg_rate=1.0)
    _, c_text = text.get_input(image_batch(n=2, caption=["abc", "de"]), "image", cond_dropout=True)
    torch.testing.assert_close(c_text, text.get_unconditional_conditioning(2))
    assert c_text.abs().sum() == 0  # the tiny encoder maps the empty caption to zeros


def test_one_dropout_owner_for_an_embedder_with_its_own_ucg_rate():
    """A ClassEmbedder's own ucg_rate (SD2-style configs) is applied once, by the model, where the returned raw
    conditioning shows it; together with the model's ucg_rate it is refused (it would drop twice)."""
    embedder = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"embed_dim": 8, "n_classes": 5, "key": "class_label", "ucg_rate": 0.5}}
    torch.manual_seed(0)
    m = make_ldm(cond_stage_config=embedder, cond_stage_key="class_label", conditioning_key="crossattn")
    n = 4000
    batch = {"image": torch.zeros(n, 1, 1, 3), "class_label": torch.zeros(n, dtype=torch.long)}
    _, c, xc = m.get_input(batch, "image", return_original_cond=True, cond_dropout=True)
    dropped = xc["class_label"] == 4
    assert abs(dropped.float().mean().item() - 0.5) < 0.04
    weight = m.cond_stage_model.embedding.weight
    torch.testing.assert_close(c[:, 0], weight[xc["class_label"]])  # c is the encoding of what xc says
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="conditioning dropout is set twice"):
        make_ldm(cond_stage_config=embedder, cond_stage_key="class_label", conditioning_key="crossattn",
                 ucg_rate=0.1)


def test_shorten_cond_schedule_noises_conditioning():
    m = make_ldm(cond_stage_config={"target": "torch.nn.Identity"}, conditioning_key="crossattn",
                 num_timesteps_cond=5)
    assert m.cond_ids[:5].tolist() == [0, 5, 10, 14, 19] and (m.cond_ids[5:] == 19).all()
    # ancestral sampling noises the given conditioning at each step, as training does (not compounding)
    cond = torch.full((2, 3, 8), 2.0)
    m.p_sample_loop(cond, (2, 3, 4, 4), verbose=False)
    contexts = {int(call["t"][0]): call["context"] for call in unet(m).calls}
    a = m.alphas_cumprod[19]
    first = contexts[19]  # cond_ids[19] = 19
    assert abs(first.mean().item() - 2.0 * a.sqrt().item()) < 0.2 and abs(first.std() - (1 - a).sqrt()) < 0.15
    torch.testing.assert_close(contexts[0], m.sqrt_alphas_cumprod[0] * cond, atol=0.1, rtol=0)  # t = 0: barely
    with pytest.raises(ValueError, match="num_timesteps_cond"):
        make_ldm(num_timesteps_cond=50)


def test_checkpoint_round_trip_with_ema_and_strict_load(tmp_path):
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 cond_stage_trainable=True, use_ema=True, scale_by_std=True)
    sd = m.state_dict()
    assert "model_ema.diffusion_modelbias" in sd and "cond_stage_model.embedding.weight" in sd
    assert not any(k.startswith("model_ema.") and "cond_stage" in k for k in sd)
    path = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": sd}, path)
    fresh = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                     cond_stage_trainable=True, use_ema=True, scale_by_std=True)
    fresh.load_state_dict(sd, strict=True)
    restored = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                        cond_stage_trainable=True, use_ema=True, scale_by_std=True, ckpt_path=str(path))
    torch.testing.assert_close(restored.cond_stage_model.embedding.weight, m.cond_stage_model.embedding.weight)
    assert restored.restarted_from_ckpt


def test_sampling_api_shapes_and_inpainting_mask_keeps_known_region():
    torch.manual_seed(0)
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 log_every_t=5)
    c = m.get_learned_conditioning({"class_label": torch.tensor([0, 1])})
    samples, inter = m.sample(c, batch_size=2, return_intermediates=True, verbose=False)
    assert samples.shape == (2, 3, 4, 4) and len(inter) == 1 + 5  # x_T, then t = 19, 15, 10, 5, 0
    x0 = torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2] = 1.0
    out = m.sample(c, batch_size=2, x0=x0, mask=mask, verbose=False)
    # at the last step q_sample(x0, 0) = sqrt(a_0) x0 + small noise replaces the kept region
    assert (out[..., :2] - m.sqrt_alphas_cumprod[0] * x0[..., :2]).abs().max() < 5 * m.sqrt_one_minus_alphas_cumprod[0]
    img, prog = m.progressive_denoising(c, shape=(3, 4, 4), batch_size=2, verbose=False)
    assert img.shape == (2, 3, 4, 4) and len(prog) == 5


def test_log_images_keys_and_guided_samples():
    torch.manual_seed(0)
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 timesteps=6, log_every_t=3, ucg_rate=0.1)
    batch = image_batch(n=2, class_label=torch.tensor([1, 2]))
    log = m.log_images(batch, N=2, n_row=2, ddim_steps=None, unconditional_guidance_scale=3.0, inpaint=True,
                       split="train")
    for key in ("inputs", "reconstruction", "diffusion_row", "samples", "samples_cfg_scale_3.00",
                "samples_inpainting", "samples_outpainting", "mask", "progressive_row"):
        assert key in log, key
    torch.testing.assert_close(log["reconstruction"], log["inputs"])  # identity first stage
    assert log["samples"].shape == (2, 3, 4, 4)
    only = m.log_images(batch, N=2, ddim_steps=None, sample=False, plot_progressive_rows=False,
                        return_keys=["inputs"])
    assert list(only) == ["inputs"]


def test_inpainting_conditioning_appends_latent_mask():
    kl = {"target": "tests.test_ddpm_support.ScaledKLStage", "params": {"scale": 2.0}}
    m = make_ldm(unet_config=spy(7, 3), first_stage_config=kl, cond_stage_config="__is_first_stage__",
                 cond_stage_key="masked_image", concat_mode=True, concat_mask_key="mask")
    mask = torch.zeros(2, 4, 4, 1)
    mask[:, :2] = 1.0
    batch = image_batch(n=2, masked_image=torch.rand(2, 4, 4, 3), mask=mask)
    z, c = m.get_input(batch, "image", bs=1)
    assert c.shape == (1, 4, 4, 4)
    torch.testing.assert_close(c[:, :3], 2.0 * batch["masked_image"][:1].permute(0, 3, 1, 2))
    torch.testing.assert_close(c[:, 3:], 2.0 * mask[:1].permute(0, 3, 1, 2) - 1.0)
    m(z, c)
    assert unet(m).calls[-1]["x"].shape == (1, 7, 4, 4)


def test_config_errors_name_latent_diffusion_keys():
    from ldm.util import ConfigError, instantiate_from_config

    params = dict(unet_config=spy(), first_stage_config=IDENTITY, cond_stage_config="__is_unconditional__",
                  timesteps=10)
    with pytest.raises(ConfigError, match="'concat_mode'"):
        instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                 "params": {**params, "concat_mod": True}})
    with pytest.raises(ConfigError, match="'log_every_t'"):  # DDPM's keys are checked through **kwargs
        instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                 "params": {**params, "log_every": 5}})


def test_real_tiny_unet_and_class_embedder_under_bf16_autocast():
    from pathlib import Path

    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(Path(__file__).parent / "configs" / "ldm-stage2.yaml").model
    cfg.params.first_stage_config = {"target": "tests.test_ddpm_support.IdentityStage", "params": {"embed_dim": 2}}
    torch.manual_seed(0)
    m = instantiate_from_config(cfg)
    with torch.no_grad():  # the UNet's last conv starts at zero; give it an output
        for p in m.model.diffusion_model.out.parameters():
            p.normal_(0, 0.1)
    x, noise = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    c = m.get_learned_conditioning({"class_label": torch.tensor([1, 2])})
    t = torch.tensor([3, 40])
    ref, _ = m.p_losses(x, c, t, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = m.p_losses(x, c, t, noise=noise)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 0.05 * ref.item()
    uc = m.get_unconditional_conditioning(2)
    torch.testing.assert_close(uc, m.cond_stage_model.embedding.weight[[4, 4]][:, None])


def test_log_images_shows_captions_and_class_names_as_text():
    text = make_ldm(cond_stage_config=TEXT, cond_stage_key="caption", conditioning_key="crossattn", timesteps=4)
    log = text.log_images(image_batch(n=2, hw=16, caption=["a long caption", ""]), N=2, ddim_steps=None,
                          sample=False, plot_progressive_rows=False, plot_diffusion_rows=False)
    cond = log["conditioning"]
    assert cond.shape == (2, 3, 16, 16) and cond.min() >= -1 and cond.max() <= 1
    assert (cond[0] < 0).any() and (cond[1] == 1).all()  # ink for the caption, blank for the empty one
    cls = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn", timesteps=4)
    batch = image_batch(n=2, hw=16, class_label=torch.tensor([0, 1]), human_label=["tench", "goldfish"])
    log = cls.log_images(batch, N=2, ddim_steps=None, sample=False, plot_progressive_rows=False,
                         plot_diffusion_rows=False)
    assert log["conditioning"].shape == (2, 3, 16, 16)
    kl = {"target": "tests.test_ddpm_support.ScaledKLStage", "params": {"scale": 2.0}}
    inpaint = make_ldm(unet_config=spy(7, 3), first_stage_config=kl, cond_stage_config="__is_first_stage__",
                       cond_stage_key="masked_image", concat_mode=True, concat_mask_key="mask", timesteps=4)
    batch = image_batch(n=2, masked_image=torch.rand(2, 4, 4, 3), mask=torch.ones(2, 4, 4, 1))
    log = inpaint.log_images(batch, N=2, ddim_steps=None, sample=False, plot_progressive_rows=False,
                             plot_diffusion_rows=False)
    torch.testing.assert_close(log["conditioning"], batch["masked_image"].permute(0, 3, 1, 2))


def test_cond_stage_forward_names_the_conditioner_method():
    m = make_ldm(cond_stage_config=CLASSES, cond_stage_key="class_label", conditioning_key="crossattn",
                 cond_stage_forward="forward")
    labels = {"class_label": torch.tensor([3])}
    torch.testing.assert_close(m.get_learned_conditioning(labels), m.cond_stage_model.embedding.weight[[3]][:, None])
    bad = make_ldm(cond_stage_config=TEXT, cond_stage_key="caption", conditioning_key="crossattn",
                   cond_stage_forward="embed_text")
    with pytest.raises(AttributeError, match="embed_text"):
        bad.get_learned_conditioning(["x"])
