"""Stage-one training through a real `pl.Trainer` on CPU: manual optimisation with two optimisers."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from ldm.models.autoencoder import AutoencoderKL, VQModel

DISC_START = 6  # in batches


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ddconfig(double_z: bool) -> dict:
    return dict(double_z=double_z, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def _loss(target: str, **extra) -> dict:
    # perceptual_weight 0 keeps the steps fast (the LPIPS path is covered by tests/test_losses.py)
    return {"target": target, "params": {"disc_start": DISC_START, "disc_num_layers": 2, "disc_weight": 0.5,
                                         "perceptual_weight": 0.0, "perceptual_weights": "random", **extra}}


def _data(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Smooth colour gradients, [H x W x C] in [-1, 1] as the original datasets produce."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = (torch.rand(3, generator=g) * 2 - 1 for _ in range(3))
        img = torch.stack([torch.tanh(a[i] * xx + b[i] * yy + c[i]) for i in range(3)], dim=-1)
        out.append({"image": img})
    return out


class Recorder(pl.Callback):
    """Per batch: batch_step, whether the discriminator's parameters moved, and the logged disc_factor."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, bool, float]] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.loss.discriminator.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = any(not torch.equal(a, p) for a, p in zip(self._before, pl_module.loss.discriminator.parameters()))
        self.rows.append((pl_module.batch_step - 1, moved, float(trainer.callback_metrics["train/disc_factor"])))


def _fit(model: pl.LightningModule, epochs: int, val: bool = False) -> tuple[pl.Trainer, Recorder]:
    loader = torch.utils.data.DataLoader(_data(), batch_size=2, shuffle=False)
    rec = Recorder()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
                         limit_val_batches=2 if val else 0, num_sanity_val_steps=0,
                         check_val_every_n_epoch=epochs)
    trainer.fit(model, loader, loader if val else None)
    return trainer, rec


def _l1(model: pl.LightningModule, kl: bool) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.stack([d["image"] for d in _data()]).permute(0, 3, 1, 2)
        xrec = model(x, sample_posterior=False)[0] if kl else model(x)[0]
    model.train()
    return (x - xrec).abs().mean().item()


def _check_disc_switch(rec: Recorder) -> None:
    for step, moved, disc_factor in rec.rows:
        assert disc_factor == (1.0 if step >= DISC_START else 0.0), rec.rows
        assert moved == (step >= DISC_START), rec.rows  # zero gradients before disc_start: Adam does not move


def test_kl_training_reconstruction_falls_and_discriminator_switches_on():
    torch.manual_seed(0)
    model = AutoencoderKL(ddconfig=_ddconfig(True), lossconfig=_loss("ldm.modules.losses.LPIPSWithDiscriminator",
                                                                     kl_weight=1e-6), embed_dim=4)
    model.learning_rate = 2e-3
    before = _l1(model, kl=True)
    logvar = model.loss.logvar.detach().clone()
    disc_calls: list[int] = []
    model.loss.discriminator.register_forward_hook(lambda *_: disc_calls.append(model.batch_step))
    trainer, rec = _fit(model, epochs=20)
    after = _l1(model, kl=True)
    assert after < 0.85 * before, (before, after)
    assert [r[0] for r in rec.rows] == list(range(40))
    assert trainer.global_step == 80  # Lightning counts both optimisers' steps
    _check_disc_switch(rec)
    # before disc_start the discriminator is not run at all (its terms are zero); from then on three times a
    # batch: the generator's g_loss, then real and fake in its own step
    assert min(disc_calls) == DISC_START and len(disc_calls) == 3 * (40 - DISC_START)
    torch.testing.assert_close(model.loss.logvar.detach(), logvar)  # as in the original: not optimised
    logged = set(trainer.callback_metrics)
    assert {f"train/{k}" for k in ("aeloss", "discloss", "total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss",
                                   "d_weight", "disc_factor", "g_loss", "disc_loss", "logits_real",
                                   "logits_fake")} <= logged
    assert trainer.callback_metrics["train/d_weight"] > 0


def test_vq_training_reconstruction_falls_with_ema_and_validation():
    torch.manual_seed(2)
    model = VQModel(ddconfig=_ddconfig(False),
                    lossconfig=_loss("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", n_classes=32),
                    n_embed=32, embed_dim=4, use_ema=True, monitor="val/rec_loss")
    model.learning_rate = 2e-3
    before = _l1(model, kl=False)
    codebook = model.quantize.embedding.weight.detach().clone()
    trainer, rec = _fit(model, epochs=25, val=True)
    after = _l1(model, kl=False)
    assert after < 0.85 * before, (before, after)
    _check_disc_switch(rec)
    assert not torch.equal(model.quantize.embedding.weight, codebook)  # the codebook is trained
    assert int(model.model_ema.num_updates) == 50
    metrics = trainer.callback_metrics
    assert {"train/quant_loss", "train/perplexity", "train/cluster_usage", "val/rec_loss", "val_ema/rec_loss"} <= \
        set(metrics)
    # the last validation's rec_loss is the L1 of the final weights on the (deterministic) validation data
    torch.testing.assert_close(metrics["val/rec_loss"].item(), after, rtol=1e-4, atol=1e-5)
    assert metrics["val_ema/rec_loss"].item() != pytest.approx(after, rel=1e-6)  # the EMA weights differ


def test_vq_scheduler_and_lr_factor():
    model = VQModel(ddconfig=_ddconfig(False),
                    lossconfig=_loss("ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"),
                    n_embed=8, embed_dim=4, lr_g_factor=0.5,
                    scheduler_config={"target": "ldm.lr_scheduler.LambdaLinearScheduler",
                                      "params": {"warm_up_steps": [10], "cycle_lengths": [100], "f_start": [0.1],
                                                 "f_max": [1.0], "f_min": [1.0]}})
    with pytest.raises(RuntimeError, match="learning_rate is not set"):
        model.configure_optimizers()
    model.learning_rate = 2e-4
    (opt_ae, opt_disc), schedulers = model.configure_optimizers()
    assert [s["interval"] for s in schedulers] == ["step", "step"]
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(0.5 * 2e-4 * 0.1)  # lr_g_factor * lr * schedule(0)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.1)
    for _ in range(10):
        for s in schedulers:
            s["scheduler"].step()
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(0.5 * 2e-4)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_optimizers_cover_autoencoder_and_discriminator_separately():
    model = AutoencoderKL(ddconfig=_ddconfig(True), lossconfig=_loss("ldm.modules.losses.LPIPSWithDiscriminator"),
                          embed_dim=4)
    model.learning_rate = 1e-4
    opt_ae, opt_disc = model.configure_optimizers()
    ae = {id(p) for g in opt_ae.param_groups for p in g["params"]}
    disc = {id(p) for g in opt_disc.param_groups for p in g["params"]}
    assert not ae & disc
    assert disc == {id(p) for p in model.loss.discriminator.parameters()}
    expected_ae = {id(p) for n, p in model.named_parameters() if not n.startswith("loss.")}
    assert ae == expected_ae
    assert opt_ae.param_groups[0]["lr"] == 1e-4 and opt_ae.param_groups[0]["betas"] == (0.5, 0.9)
