"""Learning-rate multipliers with linear warm-up, for ``torch.optim.lr_scheduler.LambdaLR``.

Each scheduler is a callable ``step -> multiplier`` of the optimiser's learning rate (so use them with the
base learning rate the model was given). Configs name them as ``ldm.lr_scheduler.<Class>``.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import math
from typing import Sequence

logger = logging.getLogger(__name__)


def _warm_up(n: float, steps: float, start: float, end: float) -> float:
    """Linear ramp from `start` at step 0 to `end` at step `steps`."""
    return start + (end - start) * n / steps


def _cosine(t: float, f_min: float, f_max: float) -> float:
    """Half a cosine from `f_max` at t = 0 to `f_min` at t >= 1."""
    return f_min + 0.5 * (f_max - f_min) * (1.0 + math.cos(min(t, 1.0) * math.pi))


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max` over `warm_up_steps`, then cosine decay to `lr_min` at
    `max_decay_steps`, constant after that. The values are multipliers: use with a base learning rate of 1.
    """

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval
        self.last_lr = 0.0

    def schedule(self, n: int) -> float:
        """The multiplier at optimiser step `n`."""
        if n < self.lr_warm_up_steps:
            lr = _warm_up(n, self.lr_warm_up_steps, self.lr_start, self.lr_max)
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            lr = _cosine(t, self.lr_min, self.lr_max)
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("step %d: lr multiplier %.3e", n, lr)
        self.last_lr = lr
        return lr

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up from `f_start` to `f_max` then a cosine decay to `f_min`.

    Every argument but `verbosity_interval` is a list with one entry per cycle; cycle ``i`` lasts
    ``cycle_lengths[i]`` steps. Steps after the last cycle stay at its final value.
    """

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0) -> None:
        lists = dict(warm_up_steps=warm_up_steps, f_min=f_min, f_max=f_max, f_start=f_start,
                     cycle_lengths=cycle_lengths)
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{type(self).__name__}: one entry per cycle needed in each list, got lengths {lengths}")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0, *itertools.accumulate(self.cycle_lengths)]
        self.verbosity_interval = verbosity_interval
        self.last_f = 0.0

    def find_in_interval(self, n: int) -> int:
        """The index of the cycle that step `n` falls in (the last one for steps past the end)."""
        return min(bisect.bisect_left(self.cum_cycles, n, lo=1) - 1, len(self.cycle_lengths) - 1)

    def _decay(self, cycle: int, n: int) -> float:
        t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
        return _cosine(t, self.f_min[cycle], self.f_max[cycle])

    def schedule(self, n: int) -> float:
        """The multiplier at optimiser step `n`."""
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            f = _warm_up(n, self.lr_warm_up_steps[cycle], self.f_start[cycle], self.f_max[cycle])
        else:
            f = self._decay(cycle, n)
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("step %d of cycle %d: lr multiplier %.3e", n, cycle, f)
        self.last_f = f
        return f

    def __call__(self, n: int) -> float:
        return self.schedule(n)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like :class:`LambdaWarmUpCosineScheduler2` but after the warm-up each cycle falls linearly from `f_max`
    (at the cycle's start) towards `f_min` (at its end). With ``f_min == f_max`` this is warm-up then constant,
    as in the Stable Diffusion configs.
    """

    def _decay(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
