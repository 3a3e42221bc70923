"""The training step's small objects, chosen from the config: timestep sampler, loss weighting, EMA."""
from __future__ import annotations

import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.timestep_sampling import UniformTimesteps
from ldm.models.diffusion.weighting import UnitWeighting
from ldm.modules.ema import LitEma

SCALE_UNET = {"target": "tests.test_ddpm_support.ScaleUNet", "params": {"in_channels": 3, "out_channels": 3}}


class ConstantTimesteps:
    """Every example at step `t` (a stand-in for a new timestep sampler)."""

    def __init__(self, num_timesteps: int, t: int = 7) -> None:
        self.num_timesteps, self.t = num_timesteps, t

    def __call__(self, n, device):
        return torch.full((n,), self.t, dtype=torch.long, device=device)


class SNRWeighting:
    """w(t) = SNR(t) = a_t / (1 - a_t) (a stand-in for a new loss weighting)."""

    def __call__(self, t, alphas_cumprod, parameterization):
        a = alphas_cumprod[t]
        return a / (1 - a)


def make(**kw) -> DDPM:
    return DDPM(**{"unet_config": SCALE_UNET, "timesteps": 50, "image_size": 4, "channels": 3, "use_ema": False,
                   **kw})


def test_defaults_are_the_originals():
    m = make()
    assert isinstance(m.timestep_sampler, UniformTimesteps) and isinstance(m.loss_weighting, UnitWeighting)
    torch.manual_seed(0)
    t = m.sample_timesteps(torch.zeros(4000, 1))
    torch.manual_seed(0)
    assert torch.equal(t, torch.randint(0, 50, (4000,)))  # the original's draw, so seeded runs are unchanged
    assert torch.equal(UnitWeighting()(t, m.alphas_cumprod, m.parameterization), torch.ones(4000))


def test_a_configured_timestep_sampler_drives_training():
    m = make(timestep_sampling={"target": "tests.test_training_objects.ConstantTimesteps", "params": {"t": 7}})
    assert m.timestep_sampler.num_timesteps == 50  # built with the schedule's length
    assert m.sample_timesteps(torch.zeros(3, 3, 4, 4)).tolist() == [7, 7, 7]
    x = torch.randn(3, 3, 4, 4)
    torch.manual_seed(1)
    loss, _ = m(x)  # forward draws t from the sampler
    torch.manual_seed(1)
    expected, _ = m.p_losses(x, torch.full((3,), 7))
    torch.testing.assert_close(loss, expected)


def test_a_configured_loss_weighting_weighs_each_example():
    x, noise, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([1, 10, 25, 49])
    plain, logs = make().p_losses(x, t, noise=noise)
    weighted_model = make(loss_weighting={"target": "tests.test_training_objects.SNRWeighting"})
    weighted, weighted_logs = weighted_model.p_losses(x, t, noise=noise)
    a = weighted_model.alphas_cumprod[t]
    xt = a.sqrt().view(-1, 1, 1, 1) * x + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    per_example = ((0.5 * xt - noise) ** 2).mean(dim=(1, 2, 3))  # ScaleUNet: out = 0.5 x_t; eps-prediction
    torch.testing.assert_close(weighted, (a / (1 - a) * per_example).mean())
    torch.testing.assert_close(plain, per_example.mean())
    torch.testing.assert_close(weighted_logs["train/loss_simple"], logs["train/loss_simple"])  # logged unweighted


class HalfDecayEma(LitEma):
    """LitEma with a fixed decay of 0.5 (a stand-in for a new EMA)."""

    def __init__(self, model, gain: float = 0.5):
        super().__init__(model, decay=gain, use_num_upates=False)


def test_a_configured_ema_is_built_updated_and_checkpointed_under_model_ema():
    m = make(use_ema=True, ema_config={"target": "tests.test_training_objects.HalfDecayEma", "params": {"gain": 0.5}})
    assert isinstance(m.model_ema, HalfDecayEma)
    assert set(m.state_dict()) == set(make(use_ema=True).state_dict())  # the same checkpoint names
    with torch.no_grad():
        m.model.diffusion_model.weight.fill_(1.5)
    m.on_train_batch_end(None, None, 0)
    assert m.model_ema.diffusion_modelweight.item() == pytest.approx(0.5 * 0.5 + 0.5 * 1.5)
    with m.ema_scope():
        assert m.model.diffusion_model.weight.item() == pytest.approx(1.0)
    assert m.model.diffusion_model.weight.item() == 1.5
    with pytest.raises(TypeError, match="nn.Module"):
        make(use_ema=True, ema_config={"target": "tests.test_training_objects.NotAModule"})


class NotAModule:
    def __init__(self, model):
        self.model = model
