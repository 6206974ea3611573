"""Learning-rate schedules: warmup then each decay has the shape its name promises."""

from __future__ import annotations

import itertools
import math

import pytest

from tuneforge.workers.core.schedules import PlateauScale, lr_multiplier, warmup_steps
from tuneforge.workers.spec import ScheduleKind, ScheduleSettings


def curve(settings: ScheduleSettings, total: int = 100, per_epoch: int = 10) -> list[float]:
    f = lr_multiplier(settings, total, per_epoch)
    return [f(step) for step in range(total)]


def test_warmup_rises_linearly_to_the_peak() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.CONSTANT, warmup_steps=10))
    assert values[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])
    assert all(v == 1.0 for v in values[10:])
    assert warmup_steps(ScheduleSettings(warmup_ratio=0.25), 100) == 25


def test_linear_decays_to_zero() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.LINEAR))
    assert values[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.01)


def test_cosine_respects_its_floor() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.COSINE, min_lr_ratio=0.1))
    assert values[0] == 1.0
    assert values[50] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert min(values) >= 0.1


def test_step_decay_drops_by_gamma_every_step_size() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.STEP, step_size=30, gamma=0.5))
    assert values[29] == 1.0 and values[30] == 0.5 and values[60] == 0.25 and values[99] == 0.125


def test_step_decay_defaults_to_once_per_epoch() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.STEP), per_epoch=10)
    assert values[9] == 1.0 and values[10] == pytest.approx(0.1)


def test_exponential_decays_every_step_after_warmup() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.EXPONENTIAL, gamma=0.9, warmup_steps=5))
    assert values[5] == 1.0
    assert values[7] == pytest.approx(0.81)


def test_cosine_with_restarts_matches_transformers() -> None:
    import torch
    from transformers import get_cosine_with_hard_restarts_schedule_with_warmup

    settings = ScheduleSettings(kind=ScheduleKind.COSINE_WITH_RESTARTS, warmup_steps=10, num_cycles=3)
    ours = lr_multiplier(settings, 100, 10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, 10, 100, num_cycles=3)
    for step in range(10, 100):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step)), step
    assert ours(40) == pytest.approx(1.0)  # a restart: back at the peak


def test_polynomial_matches_transformers() -> None:
    import torch
    from transformers import get_polynomial_decay_schedule_with_warmup

    settings = ScheduleSettings(kind=ScheduleKind.POLYNOMIAL, warmup_steps=5, power=2.0, min_lr_ratio=0.1)
    ours = lr_multiplier(settings, 50, 10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_polynomial_decay_schedule_with_warmup(optimizer, 5, 50, lr_end=0.1, power=2.0)
    for step in range(5, 50):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step)), step


def test_one_cycle_rises_then_anneals() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.ONE_CYCLE), total=100)
    assert values[0] == pytest.approx(1 / 25)  # starts at peak / div_factor
    assert max(values) == pytest.approx(values[30]) == pytest.approx(1.0)  # peak after 30% of the steps
    assert values[99] < 1e-3 and values[99] > 1 / (25 * 1e4)  # towards peak / (div * final_div)
    assert all(a < b for a, b in itertools.pairwise(values[:30]))
    assert all(a > b for a, b in itertools.pairwise(values[30:]))


def test_multi_step_drops_at_each_milestone() -> None:
    values = curve(ScheduleSettings(kind=ScheduleKind.MULTI_STEP, milestones=(20, 50), gamma=0.5))
    assert values[19] == 1.0 and values[20] == 0.5 and values[49] == 0.5 and values[50] == 0.25


def test_reduce_on_plateau_scales_after_patience() -> None:
    plateau = PlateauScale(gamma=0.5, patience=2, maximize=False)
    f = lr_multiplier(ScheduleSettings(kind=ScheduleKind.REDUCE_ON_PLATEAU, warmup_steps=2), 100, 10, plateau)
    assert [plateau.observe(v) for v in (1.0, 0.9, 0.95, 0.92, 0.91)] == [False, False, False, True, False]
    assert f(50) == 0.5 and f(0) == pytest.approx(0.5 / 3)
    maximizing = PlateauScale(gamma=0.1, patience=1, maximize=True)
    assert [maximizing.observe(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]
    assert maximizing.scale == pytest.approx(0.1)
