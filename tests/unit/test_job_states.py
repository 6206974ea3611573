"""The job state machine: the allowed moves and nothing else."""

from __future__ import annotations

import pytest

from tuneforge.server.job_states import ALLOWED, TERMINAL, IllegalTransition, JobState, check_transition


def test_terminal_states_are_final() -> None:
    for state in TERMINAL:
        for target in JobState:
            with pytest.raises(IllegalTransition):
                check_transition(state, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.QUEUED, JobState.CANCELLED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.CANCELLING),
        (JobState.CANCELLING, JobState.CANCELLED),
    ],
)
def test_allowed_moves(current: JobState, target: JobState) -> None:
    check_transition(current, target)


def test_cancelling_cannot_succeed_and_queued_cannot_skip_running() -> None:
    with pytest.raises(IllegalTransition, match="CANCELLING cannot become SUCCEEDED"):
        check_transition(JobState.CANCELLING, JobState.SUCCEEDED)
    with pytest.raises(IllegalTransition):
        check_transition(JobState.QUEUED, JobState.SUCCEEDED)
    assert set(ALLOWED) == set(JobState)
