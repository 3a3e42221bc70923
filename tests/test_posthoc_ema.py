"""Power-function EMA profiles and post-hoc reconstruction of an EMA length that was not tracked."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from scipy import integrate
from torch import nn

from ldm.checkpoint import CheckpointError, load_state_dict, save_safetensors
from ldm.modules.ema import LitEma, PowerFunctionProfile
from ldm.modules.power_ema import (PowerFunctionEMA, gamma_to_sigma_rel, response_inner_product,
                                   sigma_rel_to_gamma, solve_coefficients)
from ldm.posthoc_ema import (PostHocEMAError, apply_to_state_dict, list_snapshots, read_snapshot, reconstruct)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "posthoc_ema.py"


def test_sigma_rel_and_gamma_convert_both_ways():
    # the two profiles EDM2 keeps (its paper quotes gamma = 16.97 and 6.94)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.13, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match=f"sigma_rel={bad}"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100, 16.97, 100, 6.94), (40, 6.94, 100, 16.97), (100, 3.0, 30, 0.5)])
def test_inner_product_matches_quadrature(t_a, g_a, t_b, g_b):
    def p(s, t, g):
        return (g + 1) * s ** g / t ** (g + 1) if s <= t else 0.0

    numeric = integrate.quad(lambda s: p(s, t_a, g_a) * p(s, t_b, g_b), 0, min(t_a, t_b), limit=200)[0]
    assert response_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-8)


def train(steps: int, tracked: dict[str, nn.Module], snapshot_every: int, directory: Path | None,
          phema: PowerFunctionEMA | None, seed: int = 0) -> tuple[nn.Module, dict[int, dict[str, torch.Tensor]]]:
    """Trains a tiny regression net with SGD on noisy minibatches, updating every EMA in `tracked` and `phema` after
    each step and writing snapshots; returns the net and copies of the tracked EMAs at each snapshot step."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
    net[2].bias.requires_grad_(False)
    for ema_factory_name, factory in list(tracked.items()):
        tracked[ema_factory_name] = factory(net)
    phema = phema(net) if phema is not None else None
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    w_true = torch.randn(4, 1)
    history = {}
    for step in range(1, steps + 1):
        x = torch.randn(16, 4)
        loss = ((net(x) - x @ w_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in tracked.values():
            ema(net)
        if phema is not None:
            phema(net)
            if step % snapshot_every == 0:
                phema.save_snapshots(directory, step)
                history[step] = {k: {n: v.clone() for n, v in ema.named_buffers()} for k, ema in tracked.items()}
    return net, history


def test_reconstruction_matches_a_directly_tracked_profile(tmp_path):
    """Profiles 0.05 and 0.10 are snapshotted every 20 of 400 steps; 0.075 is tracked directly and must be
    reconstructed from the snapshots far more closely than either stored profile approximates it."""
    gamma = sigma_rel_to_gamma(0.075)
    tracked = {"direct": lambda net: LitEma(net, decay=1.0, schedule=PowerFunctionProfile(gamma)),
               "short": lambda net: LitEma(net, decay=1.0, schedule=PowerFunctionProfile(sigma_rel_to_gamma(0.05)))}
    _, history = train(400, tracked, 20, tmp_path, lambda net: PowerFunctionEMA(net, (0.05, 0.10)))
    snapshots = list_snapshots(tmp_path)
    assert len(snapshots) == 40 and {s.t for s in snapshots} == set(range(20, 401, 20))
    for step in (400, 200):
        rec = reconstruct(snapshots, 0.075, step=step)
        assert set(rec) == {"0.weight", "0.bias", "2.weight"}  # the frozen bias is not tracked
        direct, short = history[step]["direct"], history[step]["short"]
        for name, value in rec.items():
            s_name = name.replace(".", "")
            err = (value - direct[s_name]).norm()
            assert err < 0.05 * (short[s_name] - direct[s_name]).norm(), name
            assert err < 1e-3 * direct[s_name].norm(), name
    # a stored length is reproduced exactly by its own snapshot
    rec = reconstruct(snapshots, 0.05, step=400)
    torch.testing.assert_close(rec["0.weight"], history[400]["short"]["0weight"], rtol=1e-5, atol=1e-6)


def test_lengths_outside_the_reconstructable_range_are_refused_by_name(tmp_path):
    _, _ = train(100, {}, 20, tmp_path, lambda net: PowerFunctionEMA(net, (0.05, 0.10)))
    snapshots = list_snapshots(tmp_path)
    with pytest.raises(PostHocEMAError, match=r"sigma_rel=0\.005 is outside the reconstructable range") as info:
        reconstruct(snapshots, 0.005)
    # the range it names holds the stored lengths, and its ends are where the residual crosses the bound
    lo, hi = map(float, re.search(r"sigma_rel in \[([\d.]+), ([\d.]+)\]", str(info.value)).groups())
    assert lo < 0.05 and hi > 0.10
    times, gammas = [s.t for s in snapshots], [s.gamma for s in snapshots]
    residual = [solve_coefficients(times, gammas, 100, sigma_rel_to_gamma(v))[1]
                for v in (lo - 1e-3, lo, hi, hi + 1e-3)]
    assert residual[0] > 0.1 >= residual[1] and residual[2] <= 0.1 < residual[3]
    with pytest.raises(PostHocEMAError, match=r"sigma_rel=0\.3 is outside"):
        reconstruct(snapshots, 0.3)
    with pytest.raises(PostHocEMAError, match="no post-hoc EMA snapshot at step 50"):
        reconstruct(snapshots, 0.08, step=50)
    # a relaxed bound accepts what the default refuses, and the residual really is the fit's
    _, err = solve_coefficients([s.t for s in snapshots], [s.gamma for s in snapshots], 100, sigma_rel_to_gamma(0.005))
    assert err > 0.1
    reconstruct(snapshots, 0.005, max_error=err + 1e-6)


def test_bad_snapshot_files_are_named(tmp_path):
    _, _ = train(40, {}, 20, tmp_path, lambda net: PowerFunctionEMA(net, (0.05,)))
    snapshots = list_snapshots(tmp_path)
    other = tmp_path / "phema-000000040-0.0500.safetensors"
    meta = {"format": "ldm-posthoc-ema", "t": "40", "step": "40", "sigma_rel": "0.05", "gamma": "16.97"}
    save_safetensors({"0.weight": torch.zeros(3, 3)}, other, metadata=meta)
    with pytest.raises(CheckpointError, match=r"phema-000000040-0\.0500\.safetensors does not match.*0\.bias"):
        reconstruct(list_snapshots(tmp_path), 0.05)
    save_safetensors({"x": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="phema-000000040-0.0500.safetensors is not a post-hoc EMA snapshot"):
        read_snapshot(other)
    assert snapshots[0].path.name == "phema-000000020-0.0500.safetensors"


def test_profile_lengths_are_checked_on_resume():
    net = nn.Linear(2, 2)
    state = PowerFunctionEMA(net, (0.05, 0.10)).state_dict()
    PowerFunctionEMA(net, (0.05, 0.10)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"sigma_rels \[0\.05, 0\.1\] but the config asks for \[0\.05, 0\.2\]"):
        PowerFunctionEMA(net, (0.05, 0.20)).load_state_dict(state)


def load_script():
    spec = importlib.util.spec_from_file_location("scripts_posthoc_ema", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_a_checkpoint_that_loads_strictly(tmp_path, capsys):
    """Snapshots of a module tracked as `model` go into a checkpoint with model.* and model_ema.* keys."""
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))
            self.model_ema = LitEma(self.model)

    snap_dir = tmp_path / "snaps"
    net, _ = train(60, {}, 20, snap_dir, lambda net: PowerFunctionEMA(net, (0.05, 0.10)))
    base = Wrapper()
    base.model.load_state_dict(net.state_dict())
    torch.save({"state_dict": base.state_dict()}, tmp_path / "last.ckpt")
    script = load_script()
    script.main(["--snapshots", str(snap_dir), "--list"])
    assert "reconstructable at t=60" in capsys.readouterr().out
    out = script.main(["--snapshots", str(snap_dir), "--sigma_rel", "0.08", "--ckpt", str(tmp_path / "last.ckpt"),
                       "--out", str(tmp_path / "phema.ckpt")])
    fresh = Wrapper()
    fresh.load_state_dict(load_state_dict(out), strict=True)
    rec = reconstruct(list_snapshots(snap_dir), 0.08)
    torch.testing.assert_close(fresh.model[0].weight, rec["0.weight"])
    torch.testing.assert_close(fresh.model_ema.get_buffer("0weight"), rec["0.weight"])
    assert torch.equal(fresh.model[2].bias, net[2].bias)  # untracked (frozen) weights come from the checkpoint
    with pytest.raises(CheckpointError, match="3 missing keys: model.0.bias, model.0.weight, model.2.weight"):
        apply_to_state_dict({"model.2.bias": torch.zeros(1)}, rec)
