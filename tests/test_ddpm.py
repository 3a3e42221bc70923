"""DDPM: schedule buffers, q_sample, parameterisations, p_losses by hand, EMA, checkpoints, optimisers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.parameterization import target, to_x0_eps
from ldm.models.diffusion.schedule import BUFFER_NAMES
from ldm.util import ConfigError, instantiate_from_config

SCALE_UNET = {"target": "tests.test_ddpm_support.ScaleUNet", "params": {"in_channels": 3, "out_channels": 3}}


def make_ddpm(**kw) -> DDPM:
    params = dict(unet_config=SCALE_UNET, timesteps=50, image_size=4, channels=3, use_ema=False)
    params.update(kw)
    return DDPM(**params)


def closed_form(schedule: str, T: int, s: float, e: float, cosine_s: float = 8e-3) -> dict[str, np.ndarray]:
    """The schedule written out independently in float64 (Ho et al. 2020; Nichol & Dhariwal 2021)."""
    i = np.arange(T, dtype=np.float64)
    if schedule == "linear":
        betas = (math.sqrt(s) + (math.sqrt(e) - math.sqrt(s)) * i / (T - 1)) ** 2
    elif schedule == "sqrt_linear":
        betas = s + (e - s) * i / (T - 1)
    elif schedule == "sqrt":
        betas = np.sqrt(s + (e - s) * i / (T - 1))
    else:
        f = lambda k: math.cos(((k / T + cosine_s) / (1 + cosine_s)) * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(k + 1) / f(k), 0.999) for k in range(T)])
    ac = np.array([np.prod(1 - betas[:k + 1]) for k in range(T)])
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
        "log_one_minus_alphas_cumprod": np.log(1 - ac), "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
    }


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sqrt_linear", "sqrt"])
def test_schedule_buffers_match_closed_form(schedule):
    s, e = (1e-4, 2e-2) if schedule != "linear" else (0.0015, 0.0195)
    m = make_ddpm(beta_schedule=schedule, linear_start=s, linear_end=e, timesteps=100)
    ref = closed_form(schedule, 100, s, e)
    for name in BUFFER_NAMES:
        got = getattr(m, name).double().numpy()
        assert got.dtype == np.float64 and getattr(m, name).dtype == torch.float32
        np.testing.assert_allclose(got, ref[name], rtol=2e-5, atol=1e-7, err_msg=name)
    # state dict: the twelve persistent buffers in the original order; lvlb_weights and logvar are not saved
    keys = [k for k in m.state_dict() if not k.startswith("model.")]
    assert keys == list(BUFFER_NAMES)
    assert m.lvlb_weights.shape == (100,) and torch.isfinite(m.lvlb_weights).all()


def test_lvlb_weights_eps_formula():
    m = make_ddpm(timesteps=20)
    w = m.betas ** 2 / (2 * m.posterior_variance * (1 - m.betas) * (1 - m.alphas_cumprod))
    torch.testing.assert_close(m.lvlb_weights[1:], w[1:])
    assert m.lvlb_weights[0] == m.lvlb_weights[1]


def test_q_sample_statistics():
    torch.manual_seed(0)
    m = make_ddpm(timesteps=100)
    x0 = torch.full((20000, 1, 2, 2), 0.7)
    for step in (0, 37, 99):
        t = torch.full((x0.shape[0],), step, dtype=torch.long)
        xt = m.q_sample(x0, t)
        a = m.alphas_cumprod[step].item()
        assert abs(xt.mean().item() - math.sqrt(a) * 0.7) < 0.01 + 0.02 * math.sqrt(1 - a)
        assert abs(xt.var().item() - (1 - a)) < 0.03 * (1 - a) + 1e-6
    mean, var, log_var = m.q_mean_variance(x0[:2], torch.tensor([5, 5]))
    torch.testing.assert_close(var.flatten(), (1 - m.alphas_cumprod[[5, 5]]))
    torch.testing.assert_close(log_var.exp(), var)


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_parameterisation_round_trip(p):
    torch.manual_seed(0)
    m = make_ddpm(parameterization=p, timesteps=1000)
    x0, eps = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    xt = m.q_sample(x0, t, eps)
    alpha = m.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = m.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    out = m.get_target(x0, eps, t)
    torch.testing.assert_close(out, target(p, x0, eps, alpha, sigma))
    x0_hat, eps_hat = to_x0_eps(p, out, xt, alpha, sigma)
    # x0 from eps at t = 999 divides by sqrt(a_T) ~ 0.006: allow for float32 rounding there
    torch.testing.assert_close(x0_hat[:5], x0[:5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat[1:], eps[1:], rtol=1e-4, atol=1e-3)
    if p == "v":
        torch.testing.assert_close(m.get_v(x0, eps, t), alpha * eps - sigma * x0)
    if p == "eps":
        torch.testing.assert_close(m.predict_start_from_noise(xt, t, eps)[:5], x0[:5], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p,loss_type", [("eps", "l2"), ("x0", "l1"), ("v", "l2")])
def test_p_losses_matches_hand_computation(p, loss_type):
    torch.manual_seed(0)
    m = make_ddpm(parameterization=p, loss_type=loss_type, original_elbo_weight=0.3, l_simple_weight=2.0,
                  learn_logvar=True, logvar_init=0.25)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 3, 20, 49])
    loss, logs = m.p_losses(x0, t, noise=noise)
    a = m.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    xt = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    out = 0.5 * xt  # ScaleUNet with weight 0.5
    tgt = {"eps": noise.double(), "x0": x0.double(), "v": a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()}[p]
    err = (out - tgt).abs() if loss_type == "l1" else (out - tgt) ** 2
    per = err.mean(dim=(1, 2, 3))
    simple = 2.0 * (per / math.exp(0.25) + 0.25).mean()
    vlb = (m.lvlb_weights[t].double() * per).mean()
    torch.testing.assert_close(loss.double(), simple + 0.3 * vlb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_simple"].double(), per.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_vlb"].double(), vlb, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert m.logvar.grad is not None and m.logvar.grad[t].abs().sum() > 0


def test_ema_names_update_and_scope():
    m = make_ddpm(use_ema=True)
    sd = m.state_dict()
    assert {"model_ema.decay", "model_ema.num_updates", "model_ema.diffusion_modelweight"} <= set(sd)
    assert sd["model_ema.num_updates"].dtype == torch.int32
    w = m.model.diffusion_model.weight
    with torch.no_grad():
        w.fill_(1.5)
    m.on_train_batch_end(None, None, 0)  # first update: decay = min(0.9999, 2/11)
    d = 2 / 11
    expected = d * 0.5 + (1 - d) * 1.5
    assert m.model_ema.num_updates.item() == 1
    assert abs(m.model_ema.diffusion_modelweight.item() - expected) < 1e-6
    with m.ema_scope("test"):
        assert abs(w.item() - expected) < 1e-6
    assert w.item() == 1.5


def test_ckpt_path_and_ignore_keys(tmp_path):
    m = make_ddpm(use_ema=True)
    with torch.no_grad():
        m.model.diffusion_model.weight.fill_(3.0)
        m.model_ema.diffusion_modelweight.fill_(7.0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": m.state_dict()}, path)
    restored = make_ddpm(use_ema=True, ckpt_path=str(path), ignore_keys=["model_ema."])
    assert restored.model.diffusion_model.weight.item() == 3.0
    assert restored.model_ema.diffusion_modelweight.item() == 0.5  # ignored: keeps its init
    assert restored.restarted_from_ckpt
    only = make_ddpm(ckpt_path=str(path), load_only_unet=True, ignore_keys=["model_ema", "betas"])
    assert only.model.diffusion_model.weight.item() == 0.5  # keys of the full model do not match the wrapper
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        make_ddpm(ckpt_path=str(tmp_path / "missing.ckpt"))


def test_config_validation_names_bad_keys():
    with pytest.raises(ConfigError, match="params.timestep"):
        instantiate_from_config({"target": "ldm.models.diffusion.ddpm.DDPM",
                                 "params": {"unet_config": SCALE_UNET, "timestep": 10}})
    with pytest.raises(ValueError, match="parameterization 'mu'"):
        make_ddpm(parameterization="mu")
    with pytest.raises(ValueError, match="beta_schedule 'quad'"):
        make_ddpm(beta_schedule="quad")
    with pytest.raises(ValueError, match="loss_type 'l3'"):
        make_ddpm(loss_type="l3")


def test_configure_optimizers_with_scheduler():
    m = make_ddpm(learn_logvar=True, scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [10], "cycle_lengths": [1000], "f_start": [1e-6], "f_max": [1.0],
                   "f_min": [1.0]}})
    with pytest.raises(AttributeError, match="learning_rate"):
        m.configure_optimizers()
    m.learning_rate = 1e-3
    opts, scheds = m.configure_optimizers()
    params = opts[0].param_groups[0]["params"]
    assert any(p is m.logvar for p in params) and any(p is m.model.diffusion_model.weight for p in params)
    assert scheds[0]["interval"] == "step"
    assert opts[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 1e-6)


def test_unet_trainable_false_freezes_unet():
    m = make_ddpm(unet_trainable=False, learn_logvar=True)
    m.learning_rate = 1.0
    params = m.configure_optimizers().param_groups[0]["params"]
    assert len(params) == 1 and params[0] is m.logvar


def test_ancestral_sampling_and_log_images():
    torch.manual_seed(0)
    m = make_ddpm(timesteps=10, log_every_t=5, use_ema=True)
    img, inter = m.sample(batch_size=2, return_intermediates=True)
    assert img.shape == (2, 3, 4, 4) and len(inter) == 1 + 3  # x_T, t = 9, 5, 0
    batch = {"image": torch.rand(3, 4, 4, 3) * 2 - 1}
    log = m.log_images(batch, N=2, n_row=2)
    assert log["inputs"].shape == (2, 3, 4, 4) and log["samples"].shape == (2, 3, 4, 4)
    torch.testing.assert_close(log["inputs"], batch["image"][:2].permute(0, 3, 1, 2))
    assert log["diffusion_row"].shape[:2] == (1, 3)  # one grid: 2 rows x 3 steps (t = 0, 5, 9)
    assert log["diffusion_row"].shape[-1] == 2 + 3 * (4 + 2)


def test_p_sample_matches_posterior_at_last_step():
    """At t = 0 the step is deterministic: the posterior mean at the predicted x0, clipped."""
    m = make_ddpm(timesteps=10)
    x = torch.randn(2, 3, 4, 4)
    t = torch.zeros(2, dtype=torch.long)
    x0 = ((x - m.sqrt_one_minus_alphas_cumprod[0] * 0.5 * x) / m.sqrt_alphas_cumprod[0]).clamp(-1, 1)
    expected = m.posterior_mean_coef1[0] * x0 + m.posterior_mean_coef2[0] * x
    torch.testing.assert_close(m.p_sample(x, t), expected)


def test_bf16_autocast_loss_close_to_fp32():
    torch.manual_seed(0)
    m = make_ddpm()
    x0, noise, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([1, 2, 3, 4])
    ref, _ = m.p_losses(x0, t, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = m.p_losses(x0.bfloat16(), t, noise=noise.bfloat16())
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_posterior_of_an_oracle_output_is_the_true_posterior(p):
    """An output equal to the exact target gives p(x_{t-1} | x_t) = q(x_{t-1} | x_t, x0) for each parameterisation."""
    from ldm.models.diffusion.parameterization import NoisyInput, Prediction

    torch.manual_seed(0)
    m = make_ddpm(parameterization=p, timesteps=100)
    x0, eps = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 40, 90])
    xt = m.q_sample(x0, t, eps)
    alpha = m.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    sigma = m.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = Prediction.from_output(m.parameterization, m.get_target(x0, eps, t), NoisyInput(xt, t, alpha, sigma)).x0
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    mean, var, log_var = m.q_posterior(x0_hat, xt, t)
    q_mean, q_var, _ = m.q_posterior(x0, xt, t)
    torch.testing.assert_close(mean, q_mean, rtol=1e-4, atol=1e-4)
    expected_mean = (m.betas[t] * m.alphas_cumprod_prev[t].sqrt() / (1 - m.alphas_cumprod[t])).view(-1, 1, 1, 1) * x0 \
        + ((1 - m.alphas_cumprod_prev[t]) * (1 - m.betas[t]).sqrt() / (1 - m.alphas_cumprod[t])).view(-1, 1, 1, 1) * xt
    torch.testing.assert_close(q_mean, expected_mean, rtol=1e-3, atol=1e-3)  # float32 coefficients
    torch.testing.assert_close(var.flatten(), m.posterior_variance[t])


def test_zero_terminal_snr_with_v_prediction():
    m = make_ddpm(zero_terminal_snr=True, parameterization="v", timesteps=50)
    assert m.alphas_cumprod[-1] == 0 and m.sqrt_one_minus_alphas_cumprod[-1] == 1
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([49, 49])
    torch.testing.assert_close(m.q_sample(x0, t, noise), noise)  # pure noise at the last step
    torch.testing.assert_close(m.get_target(x0, noise, t), -x0)  # v = -x0 there: x0 stays recoverable
    loss, _ = m.p_losses(x0, t, noise=noise)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        make_ddpm(zero_terminal_snr=True, parameterization="eps")


def test_offset_noise_adds_a_per_channel_constant():
    torch.manual_seed(0)
    x = torch.zeros(4000, 3, 8, 8)
    plain = make_ddpm().sample_noise(x)
    offset = make_ddpm(noise_offset=0.5).sample_noise(x)
    # variance of the per-(example, channel) spatial mean: 1/64 for white noise, + 0.25 with the offset
    assert abs(plain.mean((2, 3)).var().item() - 1 / 64) < 0.003
    assert abs(offset.mean((2, 3)).var().item() - (0.25 + 1 / 64)) < 0.02
    assert abs(offset.var().item() - 1.25) < 0.03
