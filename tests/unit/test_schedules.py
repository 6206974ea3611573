"""Learning-rate schedules: warmup then each decay has the shape its name promises."""

from __future__ import annotations

import itertools
import math

import pytest

from workers.core.schedules import lr_multiplier, warmup_steps
from workers.spec import ScheduleKind, ScheduleSettings


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
