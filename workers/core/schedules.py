"""Learning-rate schedules as one function of the optimizer step, used through `torch.optim.lr_scheduler.LambdaLR`.

Every decay composes with the same linear warmup, so warmup works for any schedule, and the multiplier depends on
the step alone (and, for REDUCE_ON_PLATEAU, on the evaluations seen), so a resumed run gets exactly the rate it
would have had. The restart and polynomial curves follow transformers' definitions; one-cycle follows torch's
OneCycleLR (cosine annealing, div_factor 25, final_div_factor 1e4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from tuneforge.workers.spec import ScheduleKind, ScheduleSettings

DEFAULT_GAMMA = {ScheduleKind.EXPONENTIAL: 0.999, ScheduleKind.REDUCE_ON_PLATEAU: 0.5}
ONE_CYCLE_WARMUP = 0.3
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL_DIV = 1e4


@dataclass
class PlateauScale:
    """REDUCE_ON_PLATEAU: multiplies the rate by gamma after `patience` evaluations without improvement."""

    gamma: float
    patience: int
    maximize: bool
    scale: float = 1.0
    best: float | None = None
    bad_evaluations: int = 0

    def observe(self, value: float) -> bool:
        """Records an evaluation; returns True when the rate was just reduced."""
        improved = self.best is None or (value > self.best if self.maximize else value < self.best)
        if improved:
            self.best, self.bad_evaluations = value, 0
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations < self.patience:
            return False
        self.scale *= self.gamma
        self.bad_evaluations = 0
        return True


def warmup_steps(settings: ScheduleSettings, total_steps: int) -> int:
    """Warmup length in optimizer steps (one-cycle's rising phase defaults to 30% of the steps)."""
    if settings.warmup_steps:
        return min(settings.warmup_steps, total_steps)
    if settings.kind is ScheduleKind.ONE_CYCLE and not settings.warmup_ratio:
        return int(ONE_CYCLE_WARMUP * total_steps)
    return int(settings.warmup_ratio * total_steps)


def _anneal(start: float, end: float, fraction: float) -> float:
    """Cosine from start (fraction 0) to end (fraction 1), as torch's OneCycleLR anneals."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1.0)


def _decay(settings: ScheduleSettings, done: int, progress: float, steps_per_epoch: int) -> float:
    """The multiplier after warmup, `done` steps and `progress` (0..1) into the decay."""
    gamma = settings.gamma or DEFAULT_GAMMA.get(settings.kind, 0.1)
    floor = settings.min_lr_ratio
    match settings.kind:
        case ScheduleKind.CONSTANT | ScheduleKind.REDUCE_ON_PLATEAU:
            return 1.0
        case ScheduleKind.LINEAR:
            return max(0.0, 1.0 - progress)
        case ScheduleKind.COSINE:
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        case ScheduleKind.COSINE_WITH_RESTARTS:
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((settings.num_cycles * progress) % 1.0)))
        case ScheduleKind.POLYNOMIAL:
            return float((1.0 - floor) * (1.0 - progress) ** settings.power + floor)
        case ScheduleKind.STEP:
            return float(gamma ** (done // (settings.step_size or max(1, steps_per_epoch))))
        case ScheduleKind.EXPONENTIAL:
            return float(gamma**done)
        case ScheduleKind.ONE_CYCLE:
            return _anneal(1.0, 1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV), progress)
    raise ValueError(f"unknown schedule {settings.kind}")


def lr_multiplier(
    settings: ScheduleSettings, total_steps: int, steps_per_epoch: int, plateau: PlateauScale | None = None
) -> Callable[[int], float]:
    """Returns f(step) -> factor on the peak learning rate, for step = optimizer steps already taken."""
    warmup = warmup_steps(settings, total_steps)
    decay_steps = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        scale = plateau.scale if plateau is not None else 1.0
        if step < warmup:
            if settings.kind is ScheduleKind.ONE_CYCLE:
                return _anneal(1.0 / ONE_CYCLE_DIV, 1.0, step / warmup)
            return scale * (step + 1) / (warmup + 1)
        if settings.kind is ScheduleKind.MULTI_STEP:
            return scale * float((settings.gamma or 0.1) ** sum(1 for m in settings.milestones if step >= m))
        done = step - warmup
        return scale * _decay(settings, done, min(1.0, done / decay_steps), steps_per_epoch)

    return multiplier
