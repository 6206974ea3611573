"""Why a job attempt stops early. The training core raises these; the runner turns them into JobFinished events."""

from __future__ import annotations


class JobFailure(Exception):
    """A failure a person can act on: an UPPER_SNAKE reason and a message saying what to change."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidDataset(JobFailure):
    """The data cannot be used as given (the message names the file, line and problem)."""

    def __init__(self, message: str):
        super().__init__("INVALID_DATASET", message)


class TrainingCancelled(Exception):
    """The server asked this attempt to stop."""
