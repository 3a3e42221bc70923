"""ldm.lr_scheduler: warm-up then cosine / linear multipliers hit their end points and compose with LambdaLR."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def test_warm_up_cosine_end_points_and_midpoints():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.01, max_decay_steps=110)
    assert s(0) == pytest.approx(0.01)
    assert s(5) == pytest.approx((0.01 + 1.0) / 2)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx((1.0 + 0.1) / 2)  # half way through the cosine
    assert s(110) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)
    values = [s(n) for n in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # decay never rises


def test_warm_up_cosine_rejects_decay_shorter_than_warm_up():
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=10)


def test_cycles_restart_and_steps_past_the_end_stay_at_the_last_value():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[0, 5], f_min=[0.0, 0.5], f_max=[1.0, 2.0], f_start=[1.0, 0.0],
                                     cycle_lengths=[100, 50])
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.5)  # cosine midpoint of cycle 0
    assert s.find_in_interval(100) == 0 and s.find_in_interval(101) == 1  # a boundary step ends its cycle
    assert s(100) == pytest.approx(0.0)
    assert s(100 + 5) == pytest.approx(2.0)  # warmed up in cycle 1
    assert s(150) == pytest.approx(0.5)
    assert s(10_000) == pytest.approx(0.5)


def test_cycle_lists_must_have_equal_lengths():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(warm_up_steps=[1], f_min=[0.1, 0.2], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])


def test_linear_scheduler_stable_diffusion_config_is_warm_up_then_constant():
    s = LambdaLinearScheduler(warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.e-6], f_max=[1.],
                              f_min=[1.])
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx((1e-6 + 1.0) / 2)
    assert s(10000) == pytest.approx(1.0) and s(10**9) == pytest.approx(1.0)


def test_linear_decay_falls_linearly_to_f_min_at_cycle_end():
    s = LambdaLinearScheduler(warm_up_steps=[0], cycle_lengths=[100], f_start=[1.0], f_max=[1.0], f_min=[0.0])
    assert [s(n) for n in (0, 25, 50, 100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])


def test_multiplier_drives_optimizer_learning_rate_through_lambda_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    s = LambdaWarmUpCosineScheduler(warm_up_steps=4, lr_min=0.0, lr_max=1.0, lr_start=0.0, max_decay_steps=8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 * (n / 4) if n < 4 else 0.5 * 0.5 * (1 + math.cos(min((n - 4) / 4, 1) * math.pi))
                for n in range(9)]
    assert seen == pytest.approx(expected)
