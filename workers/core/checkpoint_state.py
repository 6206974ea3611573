"""Where a run stands at a checkpoint (`trainer_state.json`), as one versioned dataclass.

Every field a resume needs is declared here once. The file carries its layout number: a checkpoint from an older
layout is upgraded (its missing fields got their defaults when they were added), and one from a newer or unknown
layout fails the job with a reason a person can act on, instead of resuming into something else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tuneforge.workers.core.errors import JobFailure

LAYOUT = 3
"""This version's layout. 1: the loose keys before the layout number (train_history, baseline_metrics and
skipped_non_finite could be missing). 2: every field present, with `layout`. 3: the unreported log window
(`window_loss`, `window_steps`, `window_samples`), so a report that spans a pause or a crash averages the same steps."""

Metrics = dict[str, float]


@dataclass(frozen=True)
class PlateauState:
    """REDUCE_ON_PLATEAU's memory: the rate multiplier, the best value seen, evaluations since it improved."""

    scale: float
    best: float | None
    bad_evaluations: int


@dataclass(frozen=True)
class CheckpointState:
    """The position and bookkeeping of a run at a checkpoint (weights, optimizer and RNG are saved beside it)."""

    step: int
    epoch: int
    step_in_epoch: int
    epoch_complete: bool
    final_metrics: Metrics
    best_metrics: Metrics
    best_step: int | None
    best_details: dict[str, Any]
    history: list[Metrics]
    train_history: list[Metrics]
    baseline_metrics: Metrics
    without_improvement: int
    plateau: PlateauState | None
    skipped_non_finite: int
    window_loss: float = 0.0
    """The summed loss of the steps since the last training report (a checkpoint between reports)."""
    window_steps: int = 0
    window_samples: int = 0
    layout: int = field(default=LAYOUT)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, where: str) -> CheckpointState:
        """The state in a checkpoint's file; JobFailure(CHECKPOINT_INCOMPATIBLE) when this version cannot resume it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _incompatible(where, f"its state is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise _incompatible(where, "its state is not a JSON object")
        layout = data.get("layout", 1)
        if layout == 1:
            data = {"train_history": [], "baseline_metrics": {}, "skipped_non_finite": 0, **data, "layout": 2}
            layout = 2
        if layout == 2:
            data = {"window_loss": 0.0, "window_steps": 0, "window_samples": 0, **data, "layout": LAYOUT}
        elif layout != LAYOUT:
            raise _incompatible(where, f"it has layout {layout!r}, and this version reads layouts 1 to {LAYOUT}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - data.keys()), sorted(data.keys() - names)
        if missing or unknown:
            raise _incompatible(where, f"its state lacks {missing} and has unknown {unknown}")
        plateau = data["plateau"]
        if plateau is not None:
            data["plateau"] = PlateauState(*plateau) if isinstance(plateau, list) else PlateauState(**plateau)
        return cls(**data)


def _incompatible(where: str, why: str) -> JobFailure:
    return JobFailure(
        "CHECKPOINT_INCOMPATIBLE",
        f"the checkpoint {where} cannot be resumed by this version: {why}; cancel the job and start it again "
        "(or resume it with the Tuneforge version that wrote the checkpoint)",
    )
