"""Learning-rate schedules as one pure function of the optimizer step.

Every decay composes with the same linear warmup, and the multiplier depends on the step alone, so a resumed run
gets exactly the rate it would have had. Used through `torch.optim.lr_scheduler.LambdaLR`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from workers.spec import ScheduleKind, ScheduleSettings

DEFAULT_GAMMA = {ScheduleKind.STEP: 0.1, ScheduleKind.EXPONENTIAL: 0.999}


def warmup_steps(settings: ScheduleSettings, total_steps: int) -> int:
    """Warmup length in optimizer steps."""
    if settings.warmup_steps:
        return min(settings.warmup_steps, total_steps)
    return int(settings.warmup_ratio * total_steps)


def lr_multiplier(settings: ScheduleSettings, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Returns f(step) -> factor on the peak learning rate, for step = optimizer steps already taken."""
    warmup = warmup_steps(settings, total_steps)
    decay_steps = max(1, total_steps - warmup)
    gamma = settings.gamma or DEFAULT_GAMMA.get(settings.kind, 1.0)
    step_size = settings.step_size or max(1, steps_per_epoch)
    floor = settings.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = step - warmup
        progress = min(1.0, done / decay_steps)
        match settings.kind:
            case ScheduleKind.CONSTANT:
                return 1.0
            case ScheduleKind.LINEAR:
                return max(0.0, 1.0 - progress)
            case ScheduleKind.COSINE:
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
            case ScheduleKind.STEP:
                return float(gamma ** (done // step_size))
            case ScheduleKind.EXPONENTIAL:
                return float(gamma**done)
        raise ValueError(f"unknown schedule {settings.kind}")

    return multiplier
