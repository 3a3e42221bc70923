"""A tiny class-conditional LDM learns on CPU: the loss falls, the EMA follows, Lightning drives it."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config


def toy_batch(n: int, generator: torch.Generator) -> dict:
    """Four classes; class k is the constant image (k - 1.5) / 2 in channel 0 and its negative in channel 1."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    value = (labels.float() - 1.5) / 2
    image = torch.stack([value, -value], dim=-1)[:, None, None, :].expand(n, 4, 4, 2).clone()
    return {"image": image, "class_label": labels}


def make_model(**kw) -> LatentDiffusion:
    params = dict(
        unet_config={"target": "tests.test_ddpm_support.TinyCondUNet",
                     "params": {"in_channels": 2, "out_channels": 2, "hidden": 32, "context_dim": 8,
                                "timesteps": 100}},
        first_stage_config={"target": "tests.test_ddpm_support.IdentityStage", "params": {"embed_dim": 2}},
        cond_stage_config={"target": "tests.test_ddpm_support.TinyClassEmbedder",
                           "params": {"embed_dim": 8, "n_classes": 5}},
        cond_stage_key="class_label", conditioning_key="crossattn", cond_stage_trainable=True,
        timesteps=100, image_size=4, channels=2, linear_start=0.0015, linear_end=0.0195, use_ema=True,
        ucg_rate=0.1, monitor=None)
    params.update(kw)
    return LatentDiffusion(**params)


def test_tiny_class_conditional_ldm_loss_falls_and_ema_tracks():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = make_model()
    model.learning_rate = 3e-3
    opt = model.configure_optimizers()
    model.train()
    losses = []
    for step in range(40):
        batch = toy_batch(32, g)
        loss, logs = model.shared_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_train_batch_end(None, batch, step)
        losses.append(loss.item())
        assert torch.isfinite(loss) and "train/loss_simple" in logs
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert model.model_ema.num_updates.item() == 40
    shadow = model.model_ema.diffusion_modelinpweight
    live = model.model.diffusion_model.inp.weight
    assert not torch.equal(shadow, live)
    with model.ema_scope():
        assert torch.equal(model.model.diffusion_model.inp.weight, shadow)
    assert not torch.equal(model.model.diffusion_model.inp.weight, shadow)
    # the trained model separates the classes: its x0 prediction at a mid step moves towards the class image
    model.eval()
    batch = toy_batch(64, g)
    z, c = model.get_input(batch, "image", force_c_encode=True)
    t = torch.full((64,), 30, dtype=torch.long)
    noise = torch.randn_like(z)
    x_t = model.q_sample(z, t, noise)
    eps = model.apply_model(x_t, t, c)
    x0 = model.predict_start_from_noise(x_t, t, eps)
    err_model = (x0 - z).pow(2).mean()
    err_noisy = (x_t / model.sqrt_alphas_cumprod[30] - z).pow(2).mean()
    assert err_model < 0.5 * err_noisy


def test_lightning_fit_few_steps_updates_ema_and_lr():
    pl = pytest.importorskip("pytorch_lightning")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = make_model(scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [4], "cycle_lengths": [10 ** 6], "f_start": [0.1], "f_max": [1.0],
                   "f_min": [1.0]}})
    model.learning_rate = 1e-3
    data = [toy_batch(8, g) for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.global_step == 4
    assert model.model_ema.num_updates.item() == 4
    schedule = instantiate_from_config(model.scheduler_config)
    assert schedule.schedule(0) == pytest.approx(0.1) and schedule.schedule(2) > schedule.schedule(0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * schedule.schedule(4))
