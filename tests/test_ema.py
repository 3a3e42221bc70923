"""LitEma: the original buffer names, the warm-up decay, and store/copy/restore."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

from ldm.modules.ema import (ConstantDecay, LitEma, PowerFunctionProfile, PowerWarmup, RatioWarmup,
                             make_decay_schedule)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        self.frozen = nn.Linear(1, 1)
        self.frozen.requires_grad_(False)


def test_buffer_names_drop_dots_and_skip_frozen_parameters():
    ema = LitEma(Net())
    names = list(ema.state_dict())
    assert names[:2] == ["decay", "num_updates"]
    assert set(names[2:]) == {"diffusion_model0weight", "diffusion_model0bias", "diffusion_model1weight",
                              "diffusion_model1bias"}
    assert ema.num_updates.dtype == torch.int32 and ema.decay.dtype == torch.float32


def test_decay_warms_up_with_the_number_of_updates():
    torch.manual_seed(0)
    net = Net()
    ema = LitEma(net, decay=0.9)
    shadow = net.diffusion_model[0].weight.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            net.diffusion_model[0].weight.add_(torch.randn_like(shadow))
        ema(net)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = shadow - (1 - d) * (shadow - net.diffusion_model[0].weight.detach())
        torch.testing.assert_close(ema.diffusion_model0weight, shadow)
    assert ema.num_updates.item() == 29


def test_constant_decay_without_update_count():
    net = Net()
    ema = LitEma(net, decay=0.5, use_num_upates=False)
    start = ema.diffusion_model1bias.clone()
    with torch.no_grad():
        net.diffusion_model[1].bias.add_(2.0)
    ema(net)
    torch.testing.assert_close(ema.diffusion_model1bias, start + 1.0)
    assert ema.num_updates.item() == -1


def test_store_copy_restore_round_trip():
    net = Net()
    ema = LitEma(net)
    with torch.no_grad():
        ema.diffusion_model0weight.fill_(7.0)
    before = [p.detach().clone() for p in net.parameters()]
    ema.store(net.parameters())
    ema.copy_to(net)
    assert (net.diffusion_model[0].weight == 7.0).all()
    ema.restore(net.parameters())
    for a, b in zip(before, net.parameters()):
        assert torch.equal(a, b)


def test_loads_an_original_style_state_dict_strictly_and_rejects_bad_decay():
    ema = LitEma(Net())
    sd = {k: torch.full_like(v, 3) for k, v in ema.state_dict().items()}
    fresh = LitEma(Net())
    fresh.load_state_dict(sd, strict=True)
    assert fresh.num_updates.item() == 3 and (fresh.diffusion_model1weight == 3).all()
    with pytest.raises(ValueError, match="decay"):
        LitEma(Net(), decay=1.5)


def run_updates(ema: LitEma, net: Net, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Random-walks net's first weight `steps` times, updating `ema` after each; yields each new weight after
    its update."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            net.diffusion_model[0].weight.add_(torch.randn(net.diffusion_model[0].weight.shape, generator=gen))
        ema(net)
        yield net.diffusion_model[0].weight.detach().clone()


@pytest.mark.parametrize("power,inv_gamma,min_decay", [(2 / 3, 1.0, 0.0), (0.75, 5.0, 0.3)])
def test_power_warmup_follows_its_formula(power, inv_gamma, min_decay):
    net = Net()
    ema = LitEma(net, decay=0.85, schedule=PowerWarmup(power, inv_gamma, min_decay))
    shadow = net.diffusion_model[0].weight.detach().clone()
    for n, w in enumerate(run_updates(ema, net, 80), start=1):
        d = min(0.85, max(min_decay, 1 - (1 + (n - 1) / inv_gamma) ** -power))
        shadow = d * shadow + (1 - d) * w
        torch.testing.assert_close(ema.diffusion_model0weight, shadow)
    assert d == 0.85  # the cap was reached


def test_power_function_profile_weighs_the_history_as_eq_3():
    """After n updates with beta_k = (1 - 1/k)^(g+1) the average is sum_k [(k/n)^(g+1) - ((k-1)/n)^(g+1)] w_k."""
    net = Net()
    gamma = 6.94
    ema = LitEma(net, decay=1.0, schedule=PowerFunctionProfile(gamma))
    weights = torch.stack(list(run_updates(ema, net, 300))).double()
    k = torch.arange(1, 301, dtype=torch.float64)
    coeffs = (k / 300) ** (gamma + 1) - ((k - 1) / 300) ** (gamma + 1)
    expected = (coeffs.view(-1, 1, 1) * weights).sum(0)
    torch.testing.assert_close(ema.diffusion_model0weight.double(), expected, rtol=1e-4, atol=1e-4)


def test_schedules_keep_the_checkpoint_layout_and_the_factory_names_bad_keys():
    layouts = {tuple(LitEma(Net(), schedule=s).state_dict()) for s in (None, ConstantDecay(), PowerWarmup(),
                                                                          PowerFunctionProfile(1.0))}
    assert layouts == {tuple(LitEma(Net()).state_dict())}
    assert make_decay_schedule(None) == RatioWarmup()
    assert make_decay_schedule({"kind": "power", "power": 0.75}) == PowerWarmup(power=0.75)
    with pytest.raises(ValueError, match="ema_schedule.kind 'cosine'"):
        make_decay_schedule("cosine")
    with pytest.raises(ValueError, match="gamma"):
        make_decay_schedule({"kind": "power", "gamma": 1.0})
    with pytest.raises(ValueError, match="use_num_upates"):
        LitEma(Net(), use_num_upates=False, schedule=PowerWarmup())


def test_reset_restarts_the_average_at_the_current_weights():
    net = Net()
    ema = LitEma(net, decay=0.9)
    list(run_updates(ema, net, 5))
    with torch.no_grad():
        net.diffusion_model[1].weight.fill_(3.0)
    assert not torch.equal(ema.diffusion_model1weight, net.diffusion_model[1].weight)
    ema.reset(net)
    assert ema.num_updates.item() == 0
    for name, s_name in ema.m_name2s_name.items():
        assert torch.equal(ema.get_buffer(s_name), net.get_parameter(name)), name
    with pytest.raises(KeyError, match="diffusion_model.0.weight"):
        ema.reset(nn.Linear(1, 1))
