"""LitEma: the original buffer names, the warm-up decay, and store/copy/restore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


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
